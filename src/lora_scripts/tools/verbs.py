"""The LoRA tools' verbs for the CLI: inspect, convert, merge, combine, resize, extract. Each parses its
arguments and calls the library in tools/; cli.py lists them in its dispatch table."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_inspect(p: argparse.ArgumentParser) -> None:
    """describe a LoRA file or folder

    lora-scripts inspect output/cyberpunk_night/cyberpunk_night.safetensors
    """
    p.add_argument("path", help="a LoRA .safetensors file (kohya or diffusers) or a PEFT adapter folder")


def cmd_inspect(args) -> int:
    from lora_scripts.tools.inspect_lora import describe

    text, _ = describe(args.path)
    print(text)
    return 0


def _config_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config-dir", type=Path, default=None,
                   help="diffusers config folder of a non-standard SD model (default: the shipped SD1.5/SD2/SDXL)")


def add_prediction_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--v-parameterization", action=argparse.BooleanOptionalAction, default=None,
                   help="SD 2.x checkpoints that do not say: v-prediction (768-v models) or not (512-base)")


def add_convert(p: argparse.ArgumentParser) -> None:
    """convert a LoRA between kohya, diffusers and PEFT formats

    lora-scripts convert style.safetensors style_diffusers/ --to diffusers
    """
    p.add_argument("input", help="LoRA file or PEFT folder")
    p.add_argument("output", help="output file (kohya), folder (diffusers, peft)")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"])
    _config_dir(p)


def cmd_convert(args) -> int:
    from lora_scripts.tools.ops import convert

    out = convert(args.input, args.output, args.to, args.model_config_dir)
    print(f"wrote {out}")
    return 0


def add_merge(p: argparse.ArgumentParser) -> None:
    """bake LoRAs into a base model at chosen strengths

    lora-scripts merge --base v1-5-pruned.safetensors --lora style.safetensors:0.8 --out merged.safetensors
    """
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors / diffusers folder) or LLM")
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]")
    p.add_argument("--out", required=True, help="SD: merged single-file .safetensors; LLM: a folder")
    p.add_argument("--diffusers-out", type=Path, default=None, help="SD: also write a diffusers folder")
    _config_dir(p)
    add_prediction_flag(p)


def cmd_merge(args) -> int:
    from lora_scripts.export.peft import split_weight
    from lora_scripts.tools.model_ops import merge

    loras = [split_weight(s) for s in args.lora]
    out = merge(args.base, loras, Path(args.out), args.model_config_dir, args.diffusers_out, args.v_parameterization)
    print(f"merged {len(loras)} LoRA(s) into {out}")
    return 0


def add_combine(p: argparse.ArgumentParser) -> None:
    """one LoRA from several (exact concatenation or SVD)

    lora-scripts combine style.safetensors:0.8 character.safetensors:0.5 --out mix.safetensors --rank 16
    """
    p.add_argument("loras", nargs="+", metavar="PATH[:WEIGHT]")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=None,
                   help="SVD of the summed update to this rank; without it the ranks are concatenated (exact)")


def _print_report(report, verb: str) -> None:
    worst = min(report, key=lambda r: r.retained) if report else None
    for r in report:
        print(f"  {r.name}: rank {r.rank_in} -> {r.rank_out}, retained {r.retained:.4f} of the update's norm")
    if worst is not None:
        mean = sum(r.retained for r in report) / len(report)
        print(f"{verb}: {len(report)} modules, mean retained norm {mean:.4f}, lowest {worst.retained:.4f} ({worst.name})")


def cmd_combine(args) -> int:
    from lora_scripts.export.lora_files import read_lora
    from lora_scripts.export.peft import split_weight
    from lora_scripts.tools.ops import combine, save_like

    loras = [(read_lora(p), w) for p, w in (split_weight(s) for s in args.loras)]
    merged, report = combine(loras, args.rank)
    _print_report(report, "combine")
    print(f"wrote {save_like(merged, Path(args.out))}")
    return 0


def add_resize(p: argparse.ArgumentParser) -> None:
    """reduce a LoRA's rank by SVD

    lora-scripts resize style.safetensors --energy 0.95 --out style_small.safetensors
    """
    p.add_argument("input")
    p.add_argument("--out", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="new rank for every module")
    group.add_argument("--energy", type=float, help="per module, the least rank keeping this share of the "
                                                    "squared norm (e.g. 0.95)")


def cmd_resize(args) -> int:
    from lora_scripts.export.lora_files import read_lora
    from lora_scripts.tools.ops import resize, save_like

    lora, report = resize(read_lora(args.input), args.rank, args.energy)
    _print_report(report, "resize")
    print(f"wrote {save_like(lora, Path(args.out))}")
    return 0


def add_extract(p: argparse.ArgumentParser) -> None:
    """a LoRA from the difference between a fine-tune and its base

    lora-scripts extract --base v1-5-pruned.safetensors --tuned my-finetune.safetensors --rank 32 --out x.safetensors
    """
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True, help="the fine-tuned model of the same architecture")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", required=True, help="SD: a kohya .safetensors; LLM: a PEFT folder")
    _config_dir(p)


def cmd_extract(args) -> int:
    from lora_scripts.tools.model_ops import extract

    out, report = extract(args.base, args.tuned, args.rank, Path(args.out), args.model_config_dir)
    _print_report(report, "extract")
    print(f"wrote {out}")
    return 0
