"""`lora-scripts validate`: everything that can be checked before a model is loaded.

`train` runs the same checks first and stops on any error, so a wrong path or a broken image costs
seconds, not the hour of training that would have crashed on it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.config_rules import keys_for_other_family
from lora_scripts.data import images as imgdata
from lora_scripts.data import text as textdata
from lora_scripts.data.buckets import batches_per_epoch, image_bucket, make_buckets, views_per_bucket
from lora_scripts.data.split import split_eval
from lora_scripts.hardware import (
    Precision,
    bf16_is_emulated,
    choose_precision,
    matmul_flops,
    precision_warning,
)
from lora_scripts.models.detect import (
    SD2_PREDICTION_UNKNOWN,
    ModelTypeError,
    declared_prediction_type,
    detect_model_type,
)
from lora_scripts.models.embedded import EMBEDDED_MODELS, is_prepared, model_dir
from lora_scripts.train.plan import plan_steps

SWEET_SPOT = (50, 200)
# The share of this machine's measured matmul speed (hardware.matmul_flops, in the training precision) that
# a LoRA training step reaches, its work counted as 4 x parameters x tokens (generous: frozen weights get no
# weight gradient, the LM head sees labelled tokens only): used only for the time estimate. From the demo
# (SmolLM2-135M, batch 8, 2 cores): fp32 on an AVX2-only AMD EPYC, 357 s of steps at a probe of 115-120
# GFLOP/s: 0.62-0.67. bf16 on a Xeon with AMX: ~2e11 FLOP/s effective (2.5 min of steps) against a ~2e12
# matmul peak: ~0.1 (from the earlier runs, not re-measured with this probe). Emulated bf16 (AVX2 only):
# ~5 tokens/s against a ~1.3 GFLOP/s probe (element-wise work is not emulated, so more than 1). CUDA: a
# guess, not yet measured.
EFFICIENCY = {("cpu", "no"): 0.6, ("cpu", "bf16"): 0.1, ("cpu", "bf16-emulated"): 2.0, ("cuda", "bf16"): 0.3,
              ("cuda", "fp16"): 0.3, ("cuda", "no"): 0.3}
CHAT_TEMPLATE_TOKENS = 35  # role headers and end-of-turn tokens a chat template adds to each sample


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    message: str


@dataclass
class Report:
    model_type: str | None = None
    findings: list[Finding] = field(default_factory=list)
    n_samples: int = 0
    n_images: int = 0
    tokens_per_sample: float | None = None  # LLM data: estimated from the characters
    estimated_seconds: float | None = None  # of training steps, from the rough FLOP model below
    precision: Precision | None = None  # what `mixed_precision` means on this machine
    image_batches: int | None = None  # SD: an epoch's batches, one bucket per batch
    largest_bucket: tuple[int, int] | None = None  # SD: the bucket of the most pixels (the memory peak)
    n_captions: int = 0  # SD: captions to cache (at most one per image)

    def error(self, msg: str) -> None:
        self.findings.append(Finding("error", msg))

    def warn(self, msg: str) -> None:
        self.findings.append(Finding("warning", msg))

    def info(self, msg: str) -> None:
        self.findings.append(Finding("info", msg))

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        marks = {"error": "ERROR  ", "warning": "warning", "info": "  ok   "}
        lines = [f"[{marks[f.level]}] {f.message}" for f in self.findings]
        n_err = len(self.errors)
        n_warn = len(self.warnings)
        lines.append(f"preflight: {n_err} error(s), {n_warn} warning(s)" + ("" if n_err else " - ready to train"))
        return "\n".join(lines)


def check_environment(cfg: TrainConfig, report: Report) -> None:
    precision = report.precision = choose_precision(cfg.mixed_precision)
    device = precision.device
    if cfg.mixed_precision == "fp16" and device == "cpu":
        report.error("mixed_precision fp16 needs a CUDA GPU and none is available; use auto (the fast precision "
                     "of this machine) or no")
    else:
        report.info(f"precision: {precision.label} on {device} ({precision.reason})")
    slow = precision_warning(cfg.mixed_precision)
    if slow:
        report.warn(slow)
    if cfg.optimizer == "adamw8bit" and device == "cpu":
        report.error("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw or adafactor")


def check_output(cfg: TrainConfig, report: Report) -> None:
    out = Path(cfg.output_dir)
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        report.error(f"output_dir {out}: cannot write there ({exc.strerror})")
        return
    if out.exists() and any(out.glob("checkpoint-*")) and not cfg.resume_from:
        report.warn(f"output_dir {out} already holds checkpoints; new ones will be added beside them "
                    "(set resume_from: latest to continue that run)")


def check_base_model(cfg: TrainConfig, report: Report) -> str | None:
    name = cfg.base_model.lower()
    if name in EMBEDDED_MODELS and not is_prepared(model_dir(name)):
        report.error(f"base_model {cfg.base_model}: the embedded model is not prepared; run ./setup.sh "
                     "or `lora-scripts prepare`")
    try:
        sniffed = detect_model_type(cfg.base_model)
    except ModelTypeError as exc:
        if cfg.model_type is None:
            report.error(str(exc))
        elif not Path(cfg.base_model).exists() and name not in EMBEDDED_MODELS:
            report.error(f"base_model {cfg.base_model}: no such file or folder")
        return cfg.model_type
    except Exception as exc:  # e.g. a .ckpt that weights_only refuses
        report.error(f"base_model {cfg.base_model}: cannot be read safely ({exc})")
        return cfg.model_type
    if cfg.model_type is not None and cfg.model_type != sniffed:
        report.warn(f"model_type is {cfg.model_type} but base_model looks like {sniffed}; using {cfg.model_type}")
        return cfg.model_type
    return sniffed


def check_keys_apply(cfg: TrainConfig, model_type: str, report: Report) -> None:
    """Every key the config sets is read by this family's run, or it is an error (nothing is ignored)."""
    problems = keys_for_other_family(cfg, model_type)
    for problem in problems:
        report.error(problem)
    if not problems:
        report.info(f"config: the {len(cfg.model_fields_set)} key(s) set are all used by this {model_type} run")


def check_llm_data(cfg: TrainConfig, report: Report) -> int:
    source = cfg.resolved_metadata_path() or cfg.train_data_dir
    if source is None:
        report.error("no data: set metadata_path (prompt,response .csv or .jsonl) or train_data_dir (.txt files)")
        return 0
    try:
        samples = textdata.load_samples(Path(source))
    except textdata.DataError as exc:
        report.error(str(exc))
        return 0
    report.info(f"{source}: {len(samples)} samples")
    if cfg.eval_data_path is not None:
        try:
            held = textdata.load_samples(Path(cfg.eval_data_path))
            report.info(f"{cfg.eval_data_path}: {len(held)} eval samples")
        except textdata.DataError as exc:
            report.error(str(exc))
    n_train = len(split_eval(samples, cfg.val_ratio, cfg.seed)[0]) if cfg.eval_data_path is None else len(samples)
    chars = sum(len(s.text or "".join(m["content"] for m in s.messages or [])) for s in samples)
    report.info(f"about {chars // 4:,} tokens in all (4 characters per token)")
    if samples:
        chat = any(s.messages for s in samples)
        report.tokens_per_sample = chars / 4 / len(samples) + (CHAT_TEMPLATE_TOKENS if chat else 0)
    return n_train


def check_image_data(cfg: TrainConfig, report: Report) -> int:
    if cfg.train_data_dir is None:
        report.error("train_data_dir is required for image training")
        return 0
    folder = Path(cfg.train_data_dir)
    if not folder.is_dir():
        report.error(f"train_data_dir {folder}: not a folder")
        return 0
    items = imgdata.scan_images(folder)
    if not items:
        report.error(f"train_data_dir {folder}: no images (.jpg, .png, .webp, .bmp) found")
        return 0
    table = imgdata.CaptionTable()
    meta = cfg.resolved_metadata_path()
    if cfg.metadata_path is not None and not Path(cfg.metadata_path).exists():
        report.error(f"metadata_path {cfg.metadata_path}: not found")
    elif meta is not None:
        try:
            table = imgdata.read_caption_csv(meta)
        except imgdata.CaptionFileError as exc:
            report.error(str(exc))
        for problem in table.problems:
            (report.error if "empty caption" in problem else report.warn)(problem)
    keys = {it.key for it in items} | {it.path.name for it in items}
    for name in table.captions:
        if name not in keys:
            report.error(f"{meta}: {name} is listed but there is no such image in {folder}")
    usable = []
    for it in items:
        error, note = imgdata.check_image(it.path, cfg.resolution)
        if error:
            report.error(f"{it.key}: {error}")
            continue
        if note:
            report.warn(f"{it.key}: {note}")
        caption = table.captions.get(it.key, table.captions.get(it.path.name))
        try:
            side = imgdata.read_sidecar(it.path)
        except imgdata.CaptionFileError as exc:
            report.error(str(exc))
            continue
        if caption is not None and side is not None and side != caption:
            report.warn(f"{it.key}: metadata.csv and {it.path.with_suffix('.txt').name} disagree; the CSV is used")
        if caption is None and side is None:
            report.error(f"{it.key}: no caption (add a row to metadata.csv or a {it.path.stem}.txt)")
            continue
        usable.append(it)
    if not usable:
        return 0
    usable = check_image_eval(cfg, usable, report)
    repeats = imgdata.plan_repeats(usable, cfg.repeats)
    report.info(f"{folder}: {len(items)} images; {imgdata.describe_repeats(usable, repeats)}")
    report.n_images = len(usable)
    return plan_image_epoch(cfg, usable, repeats, report)


def check_image_eval(cfg: TrainConfig, usable: list, report: Report) -> list:
    """The held-out images (eval_data_path, or val_ratio of the folder); returns the training images."""
    if cfg.eval_data_path is not None:
        path = Path(cfg.eval_data_path)
        try:
            held = imgdata.load_eval_images(path)
            report.info(f"eval_data_path {path}: {len(held)} held-out images")
        except (imgdata.CaptionFileError, OSError) as exc:
            report.error(f"eval_data_path {path}: {exc}")
        return usable
    train, held = split_eval(usable, cfg.val_ratio, cfg.seed)
    if held:
        report.info(f"val_ratio {cfg.val_ratio}: {len(held)} of {len(usable)} images held out for the eval loss")
    return train


def plan_image_epoch(cfg: TrainConfig, usable: list, repeats: list[int], report: Report) -> int:
    """An epoch's image views, and its batches (one bucket per batch) in report.image_batches."""
    shapes = make_buckets(cfg.resolution)
    views = views_per_bucket([image_bucket(it.path, shapes) for it in usable], repeats)
    report.image_batches = batches_per_epoch(views, cfg.batch_size)
    report.largest_bucket = max(views, key=lambda wh: wh[0] * wh[1])
    report.n_captions = len(usable)  # at most: one caption per image
    report.info("buckets (width x height: views per epoch): "
                + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(views.items())))
    return sum(repeats)


def run_preflight(cfg: TrainConfig) -> Report:
    report = Report()
    check_environment(cfg, report)
    check_output(cfg, report)
    model_type = check_base_model(cfg, report)
    report.model_type = model_type
    if model_type is None:
        return report
    report.info(f"model: {cfg.base_model} ({model_type})")
    check_keys_apply(cfg, model_type, report)
    if model_type == "sd2" and cfg.v_parameterization is None and declared_prediction_type(cfg.base_model) is None:
        report.error(SD2_PREDICTION_UNKNOWN.format(base=cfg.base_model))
    if cfg.save_best and cfg.eval_data_path is None and cfg.val_ratio <= 0:
        report.error("save_best needs an eval loss to pick the best epoch: set val_ratio (e.g. 0.1) or eval_data_path")
    n = check_llm_data(cfg, report) if model_type == "llm" else check_image_data(cfg, report)
    report.n_samples = n
    if not n:
        return report
    lo, hi = SWEET_SPOT
    distinct = report.n_images or n  # repeats do not add information: judge the number of distinct samples
    if distinct < lo:
        report.warn(f"{distinct} training samples is below the {lo}-{hi} sweet spot; expect a weak or over-fitted adapter")
    elif n > hi * 5:
        report.info(f"{n} training samples: more than LoRA needs for a style; epochs can be fewer")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_steps(n, cfg, world, report.image_batches)
    if plan.steps_per_epoch == 0:
        report.error(f"{n} samples cannot fill one batch of batch_size={cfg.batch_size}")
        return report
    report.info(f"{plan.steps_per_epoch} optimizer steps per epoch, {plan.total_steps} in all over {plan.epochs} epoch(s)")
    warmup = cfg.warmup_for(plan.total_steps)
    if warmup >= plan.total_steps:
        report.error(f"warmup of {warmup} steps is not shorter than the {plan.total_steps} training steps")
    if cfg.lora_type == "adalora":
        check_adalora_schedule(cfg, plan.total_steps, report)
    if cfg.save_steps > plan.total_steps:
        report.warn(f"save_steps={cfg.save_steps} is larger than the {plan.total_steps} total steps: only the final "
                    "checkpoint will be written")
    report.info(_estimate(cfg, model_type, plan.total_steps, report))
    if model_type != "llm":
        check_sd_memory(cfg, model_type, report)
    return report


ADALORA_MIN_REACH = 0.25  # learning_rate x steps below which AdaLoRA barely moves (see check_adalora_schedule)


def check_adalora_schedule(cfg: TrainConfig, total_steps: int, report: Report) -> None:
    """AdaLoRA's budget shrinks between step tinit and step total - tfinal: peft refuses a schedule that
    leaves no step for it, after the model has loaded; here it is said first, with the numbers."""
    tinit, tfinal = cfg.adalora_schedule(total_steps)
    init_r, target_r = cfg.adalora_ranks
    if tinit >= total_steps - tfinal:
        report.error(f"AdaLoRA: adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) leave none of the {total_steps} "
                     "training steps for cutting the rank budget; lower them or train longer")
        return
    report.info(f"AdaLoRA: rank {init_r} per module for {tinit} steps, cut to an average of {target_r} by step "
                f"{total_steps - tfinal}, then fixed for the last {tfinal} steps")
    # Its singular values start at 0 and Adam moves each by about learning_rate per step, so lr x steps bounds
    # how far they get. Measured on the demo (45 steps): 1e-3 (0.045) moved the eval loss 4% and taught no
    # style; 1e-2 (0.45) learnt it as well as LoRA at 1e-3.
    reach = cfg.learning_rate * total_steps
    if reach < ADALORA_MIN_REACH:
        report.warn(f"AdaLoRA starts its singular values at zero and grows each by about learning_rate per step: "
                    f"{total_steps} steps at {cfg.learning_rate:g} reach {reach:.2g}, too little to learn much (the "
                    f"demo at 0.045 changed nearly nothing). Raise learning_rate to about "
                    f"{ADALORA_MIN_REACH * 2 / total_steps:.1g}, or train longer")


def check_sd_memory(cfg: TrainConfig, model_type: str, report: Report) -> None:
    """The per-component memory estimate (memory.py: imports torch and builds the model on the meta
    device, a few seconds, so it comes after every cheap check) and a warning, with the knobs that lower
    it, when it exceeds this machine's memory."""
    from lora_scripts.memory import device_memory, estimate_sd_memory, memory_knobs

    precision = report.precision or choose_precision(cfg.mixed_precision)
    try:
        est = estimate_sd_memory(cfg, model_type, precision.device, precision.name, report.largest_bucket,
                                 report.n_captions)
    except Exception as exc:  # an estimate must never stop a run the other checks passed
        report.info(f"memory estimate: not available for this model ({type(exc).__name__}: {exc})")
        return
    for line in est.lines():
        report.info(line)
    warning = est.warning(device_memory(precision.device), memory_knobs(cfg, precision.device))
    if warning:
        report.warn(warning)


def _estimate(cfg: TrainConfig, model_type: str, total_steps: int, report: Report) -> str:
    """A rough time and memory estimate from the model's size on disk and the data (labelled as rough)."""
    size = _model_bytes(cfg.base_model)
    if not size:
        return "time estimate: unknown model size"
    params = size / 4 if size > 0 else 0  # fp32 on disk for most bases; fp16 files are under-estimated 2x
    precision = report.precision or choose_precision(cfg.mixed_precision)
    device, name = precision.device, precision.name
    if model_type == "llm":
        per_sample = min(cfg.max_seq_length, report.tokens_per_sample or 256)  # packed: no padding to pay for
        tokens = per_sample * cfg.batch_size * cfg.gradient_accumulation_steps * total_steps
        flops = 4 * params * tokens  # frozen weights: forward 2N + input-gradient backward 2N per token
    else:
        latents = (cfg.resolution // 8) ** 2
        flops = 4 * params * latents * cfg.batch_size * cfg.gradient_accumulation_steps * total_steps / 16
    speed = matmul_flops(name, device)  # this machine, now, in the precision the run will use
    kind = f"{name}-emulated" if bf16_is_emulated(name, device) else name
    seconds = report.estimated_seconds = flops / (speed * EFFICIENCY.get((device, kind), 0.3))
    took = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    memory = ""
    if model_type == "llm":  # SD: the per-component estimate below
        memory = f", ~{params * 4 / 1e9 * (1.5 if name == 'no' else 1.2) + 1.5:.1f} GB of memory"
    return (f"rough estimate on {device} in {precision.label} (matmuls measured at {speed / 1e9:,.0f} GFLOP/s): "
            f"{took} of training steps (eval and samples extra){memory}")


def _model_bytes(base_model: str) -> int:
    name = base_model.lower()
    path = model_dir(name) if name in EMBEDDED_MODELS else Path(base_model)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*.safetensors")) or sum(
            p.stat().st_size for p in path.rglob("*.bin"))
    return 0
