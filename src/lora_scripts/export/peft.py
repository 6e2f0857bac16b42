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


def write_llm_adapter(peft_model, folder: Path, initial: Path | None = None) -> None:
    """The trained adapter of an LLM run as a PEFT folder that loads on the original base model.

    A LoRA/DoRA/rsLoRA adapter as peft saves it. AdaLoRA as the plain LoRA it computes, a rank per module
    (export/adalora.py). A PiSSA/OLoRA one (`initial`: its adapter as initialised, see
    models/llm.save_initial_adapter) through peft's conversion: trained minus initial, as a LoRA of twice
    the rank, since its frozen weights were the residual, not the model's."""
    from lora_scripts.export.adalora import adalora_peft_set, plain_peft_config
    from lora_scripts.export.lora_files import write_peft_folder

    config = peft_model.peft_config["default"]
    if config.peft_type == "ADALORA":
        lora, dropped = adalora_peft_set(peft_model)
        write_peft_folder(lora, folder, plain_peft_config(
            dropped, base_model_name_or_path=config.base_model_name_or_path, task_type="CAUSAL_LM",
            lora_dropout=config.lora_dropout))
        return
    peft_model.save_pretrained(folder, safe_serialization=True, path_initial_model_for_weight_conversion=(
        str(initial) if initial is not None else None))
