"""`lora-scripts <command>`: a thin dispatch table. Each command parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import inspect
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lora_scripts.cli_support import EXIT_BAD_INPUT, EXIT_STOPPED
from lora_scripts.cli_support import fail as _fail
from lora_scripts.generate_verbs import add_export, add_generate, cmd_export, cmd_generate

# the web UI's verb (ui/verb.py) and the LoRA tools' verbs: their arguments and calls (nothing heavy at import)
from lora_scripts.tools.verbs import (
    add_combine,
    add_convert,
    add_extract,
    add_inspect,
    add_merge,
    add_resize,
    cmd_combine,
    cmd_convert,
    cmd_extract,
    cmd_inspect,
    cmd_merge,
    cmd_resize,
)
from lora_scripts.ui.verb import add_ui, cmd_ui


def user_errors() -> tuple[type[Exception], ...]:
    """The one table of problems with the user's files, settings or inputs: a message and exit code 2, no
    traceback. Anything else is a bug and keeps its traceback."""
    from lora_scripts.config import ConfigError
    from lora_scripts.data.images import CaptionFileError
    from lora_scripts.data.text import DataError
    from lora_scripts.export.lora_files import LoraFormatError
    from lora_scripts.export.peft import LoraSpecError
    from lora_scripts.label import LabelError
    from lora_scripts.launch import LaunchError
    from lora_scripts.models.detect import ModelTypeError
    from lora_scripts.models.llm import ModelLoadError
    from lora_scripts.models.sd import SDLoadError
    from lora_scripts.safety import RunLockedError, UnsafeFileError
    from lora_scripts.sd_generate import LoraTagError
    from lora_scripts.train.errors import ResumeError, UnsupportedLaunchError
    from lora_scripts.ui.verb import UIError

    return (ConfigError, CaptionFileError, DataError, LoraSpecError, LabelError, LaunchError, ModelTypeError,
            ModelLoadError, SDLoadError, RunLockedError, UnsafeFileError, LoraFormatError, ResumeError, LoraTagError,
            UnsupportedLaunchError, UIError, FileNotFoundError)


def _load(args) -> object:
    from lora_scripts.config_file import load_config

    extra = {"mixed_precision": "fp16"} if getattr(args, "fp16", False) else {}
    if getattr(args, "bf16", False):
        extra = {"mixed_precision": "bf16"}
    return load_config(args.config, args.overrides, **extra)


# ---- train -------------------------------------------------------------------------------------------


def add_train(p: argparse.ArgumentParser) -> None:
    """train a LoRA from a YAML config

    python train.py --config configs/my_lora_config.yaml learning_rate=1e-4
    """
    p.add_argument("--config", required=True, help="the YAML config, e.g. configs/my_lora_config.yaml")
    p.add_argument("--fp16", action="store_true", help="alias of mixed_precision=fp16 (GPU)")
    p.add_argument("--bf16", action="store_true", help="alias of mixed_precision=bf16")
    p.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (GPUs, or CPU ranks over gloo)")
    p.add_argument("--accelerate-config", default=None, metavar="FILE",
                   help="run under `accelerate launch --config_file FILE` (configs/accelerate/ddp.yaml; several "
                        "machines: see the README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (events still go to events.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. learning_rate=1e-4")


def cmd_train(args) -> int:
    from lora_scripts.config import ConfigError
    from lora_scripts.launch import is_main_rank, is_rank_process, relaunch_train
    from lora_scripts.preflight import run_preflight
    from lora_scripts.train import train

    _sigterm_as_ctrl_c()
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return _fail(f"the config has problems:\n{exc}")
    if (args.num_processes > 1 or args.accelerate_config) and not is_rank_process():
        # rebuilt from the parsed arguments, so `python train.py ...` (which has no `train` word) relaunches too
        flags = [f for f, on in (("--fp16", args.fp16), ("--bf16", args.bf16), ("--no-progress", args.no_progress)) if on]
        return relaunch_train(args.num_processes, ["--config", args.config, *flags, *args.overrides],
                              args.accelerate_config)
    report = run_preflight(cfg)
    if is_main_rank():
        print(report.render(), file=sys.stderr)
    if not report.ok:
        return _fail("preflight found problems; nothing was trained")
    cfg = cfg.model_copy(update={"model_type": report.model_type})
    try:
        result = train(cfg, progress=not args.no_progress)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, ["python", "train.py", "--config", args.config, *args.overrides])
    if is_main_rank():
        where = (f"adapter in {result.adapter_dir}" if cfg.model_type == "llm" else
                 f"LoRA in {result.lora_file} (WebUI/ComfyUI: <lora:{cfg.name}:0.8>) and {result.diffusers_file} "
                 "(diffusers)")
        skipped = f" ({result.skipped_steps} updates skipped)" if result.skipped_steps else ""
        print(f"done: {result.steps} steps{skipped}; {where}; loss curve in "
              f"{result.output_dir / 'loss_curve.png'}; TensorBoard: tensorboard --logdir {cfg.log_dir}")
        end = next((e for e in reversed(result.events) if e["event"] == "end"), {})
        if "best_eval_loss" in end:
            kept = (f"; kept as {result.output_dir / (cfg.name + '-best.safetensors' if cfg.model_type != 'llm' else 'best')}"
                    if cfg.save_best else " (save_best: true keeps that adapter)")
            print(f"lowest eval loss {end['best_eval_loss']:.4f} after epoch {end['best_epoch']} (step "
                  f"{end['best_step']}){kept}")
    return 0


def _interrupted(exc: KeyboardInterrupt, command: list[str]) -> int:
    """Ctrl-C or SIGTERM: where the run stands and the command that continues it; exit code 130."""
    from lora_scripts.train.errors import TrainingInterrupted

    resume = " ".join(shlex.quote(a) for a in [*command, "resume_from=latest"])
    saved = (f"checkpoint saved: {exc.checkpoint}" if isinstance(exc, TrainingInterrupted) and exc.checkpoint
             else "stopped without saving; the last checkpoint written before it is kept")
    print(f"\ninterrupted ({saved}). Continue with:\n  {resume}", file=sys.stderr)
    return 130


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM outside the training steps (loading, generating) stops like Ctrl-C: a message, not a kill.
    During the steps the run's own handler takes over (finish the step, save, stop)."""
    import signal
    import threading

    def handle(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)


# ---- validate ------------------------------------------------------------------------------------------


def add_validate(p: argparse.ArgumentParser) -> None:
    """check a config and its data without training

    lora-scripts validate --config configs/my_lora_config.yaml
    """
    p.add_argument("--config", help="the YAML config to check")
    p.add_argument("--keys", action="store_true", help="list every config key with its documentation")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_validate(args) -> int:
    from lora_scripts.config import ConfigError
    from lora_scripts.config_rules import describe_keys
    from lora_scripts.preflight import run_preflight

    if args.keys:
        print(describe_keys())
        return 0
    if not args.config:
        return _fail("give --config FILE (or --keys to list the config keys)")
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return _fail(f"the config has problems:\n{exc}")
    report = run_preflight(cfg)
    print(report.render())
    return 0 if report.ok else EXIT_BAD_INPUT


# ---- prepare / demo / not yet --------------------------------------------------------------------------


def add_prepare(p: argparse.ArgumentParser) -> None:
    """prepare the embedded model (setup.sh runs this once)

    lora-scripts prepare
    """
    p.add_argument("--force", action="store_true", help="convert again even if the cache is valid")


def cmd_prepare(args) -> int:
    from lora_scripts.models.embedded import prepare_embedded

    prepare_embedded(force=args.force)
    return 0


def add_demo(p: argparse.ArgumentParser) -> None:
    """train the LLM house-style demo and compare base vs tuned

    lora-scripts demo        # or: lora-scripts demo --images
    """
    p.add_argument("--images", action="store_true",
                   help="the image pipeline demo on a tiny random SD model (shows the path, not real pictures)")
    p.add_argument("--config", default=None,
                   help="default: configs/examples/demo_llm_style.yaml (or demo_sd_tiny.yaml with --images)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_demo(args) -> int:
    from lora_scripts.config import ConfigError
    from lora_scripts.demo import DEFAULT_CONFIG, IMAGE_CONFIG, run_demo, run_image_demo

    _sigterm_as_ctrl_c()
    config = args.config or str(IMAGE_CONFIG if args.images else DEFAULT_CONFIG)
    try:
        return (run_image_demo if args.images else run_demo)(config, args.overrides)
    except ConfigError as exc:
        # the hint only where it is the answer: run from elsewhere, the default config is not found
        hint = ("" if args.config or Path(config).exists() else "\nthe demo's config and data live in the "
                "lora-scripts folder: run it from there (as `make demo` does), or pass --config")
        return _fail(f"{exc}{hint}")
    except KeyboardInterrupt as exc:
        return _interrupted(exc, ["lora-scripts", "demo", *(["--images"] if args.images else []),
                                  *(["--config", args.config] if args.config else []), *args.overrides])


def add_label(p: argparse.ArgumentParser) -> None:
    """auto-caption images into metadata.csv with CLIP

    lora-scripts label --input data/cyberpunk_night --clip-model ./models/clip-vit-large-patch14
    """
    p.add_argument("--input", required=True, help="folder of images, e.g. data/cyberpunk_night")
    p.add_argument("--output", help="CSV to write (default: <input>/metadata.csv)")
    p.add_argument("--clip-model", help="a local CLIP folder (transformers CLIPModel + processor)")
    p.add_argument("--captioner", help="a local image-to-text model folder whose sentence leads each prompt")
    p.add_argument("--trigger", help="word prepended to every prompt")
    p.add_argument("--max-phrases", type=int, default=8, help="most CLIP phrases per prompt")
    p.add_argument("--threshold", type=float, default=0.18,
                   help="least CLIP cosine similarity for a phrase to be used (0.18 suits OpenAI CLIP ViT-L/14)")
    p.add_argument("--extra-phrases", help="a text file of your own phrases, one per line")
    p.add_argument("--sidecar", action="store_true", help="also write kohya-style .txt files")
    p.add_argument("--dry-run", action="store_true", help="print the prompts, write nothing")
    p.add_argument("--overwrite", action="store_true", help="relabel every image in the CSV (old CSV kept as .bak); "
                   "sidecar .txt captions stay unless --sidecar is given too")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)


def cmd_label(args) -> int:
    from lora_scripts.label import LabelError, label_folder

    try:
        result = label_folder(
            Path(args.input), Path(args.output) if args.output else None, clip_model=args.clip_model,
            captioner=args.captioner, trigger=args.trigger, max_phrases=args.max_phrases, threshold=args.threshold,
            extra_phrases=Path(args.extra_phrases) if args.extra_phrases else None, sidecar=args.sidecar,
            dry_run=args.dry_run, overwrite=args.overwrite, device=args.device, batch_size=args.batch_size,
        )
    except LabelError as exc:
        return _fail(str(exc))
    output = args.output or str(Path(args.input) / "metadata.csv")
    if args.dry_run:
        width = max((len(k) for k in result.labelled), default=8)
        print(f"{'filename':<{width}}  prompt")
        for name, prompt in result.labelled.items():
            print(f"{name:<{width}}  {prompt}")
    else:
        print(f"{output}: {len(result.labelled)} image(s) labelled, {result.kept} existing caption(s) kept")
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if result.skipped:
        print(f"{len(result.skipped)} image(s) could not be read and were skipped", file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {  # each add_* docstring: the help line, then an example
    "train": (add_train, cmd_train),
    "validate": (add_validate, cmd_validate),
    "generate": (add_generate, cmd_generate),
    "export": (add_export, cmd_export),
    "prepare": (add_prepare, cmd_prepare),
    "demo": (add_demo, cmd_demo),
    "label": (add_label, cmd_label),
    "inspect": (add_inspect, cmd_inspect),
    "convert": (add_convert, cmd_convert),
    "merge": (add_merge, cmd_merge),
    "combine": (add_combine, cmd_combine),
    "resize": (add_resize, cmd_resize),
    "extract": (add_extract, cmd_extract),
    "ui": (add_ui, cmd_ui),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-scripts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, run) in COMMANDS.items():
        help_text, _, example = inspect.cleandoc(add_args.__doc__).partition("\n\n")
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return parser


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers warns on every CLIP/SigLIP processor load that torchvision is missing and it uses the PIL
    processor instead. The PIL processor is the intended path here (torchvision does not work with the CPU
    torch build), so the notice only alarms users; every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


TOOLS = ("inspect", "convert", "merge", "combine", "resize", "extract")


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as exc:  # the table is read only when something went wrong: it imports the ML libraries
        from lora_scripts.train.errors import TrainingStopped

        if isinstance(exc, TrainingStopped):
            return _fail(str(exc), EXIT_STOPPED)
        # the LoRA tools' ValueErrors are about the user's numbers and files (a rank too high, two formats)
        if isinstance(exc, user_errors() + ((ValueError,) if args.command in TOOLS else ())):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
