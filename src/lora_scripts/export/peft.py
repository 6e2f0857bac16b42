"""PEFT adapter folders (LLMs): `PATH[:WEIGHT]` specs and the checks before a folder is loaded.

Loading a base with adapters for generation is llm_generate.load_with_adapters; merging them into the base
is tools/model_ops.export_merged."""

from __future__ import annotations

import json
from pathlib import Path

from lora_scripts.safety import check_safetensors


class LoraSpecError(ValueError):
    pass


def split_weight(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` (the weight after the last colon, when it parses as a number)."""
    head, sep, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def checked_adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder, its weights checked before any library maps them."""
    folder = Path(path)
    if not (folder / "adapter_config.json").exists():
        raise LoraSpecError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    for f in folder.glob("*.safetensors"):
        check_safetensors(f)
    return folder


def is_dora(folder: Path) -> bool:
    return bool(json.loads((Path(folder) / "adapter_config.json").read_text()).get("use_dora"))
