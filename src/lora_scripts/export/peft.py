"""PEFT adapters for LLMs: load one or several at chosen strengths, and merge them into the base."""

from __future__ import annotations

import json
from pathlib import Path

from lora_scripts.models.llm import load_llm
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


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    path, weight = split_weight(spec)
    folder = Path(path)
    if not (folder / "adapter_config.json").exists():
        raise LoraSpecError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    for f in folder.glob("*.safetensors"):
        check_safetensors(f)
    return folder, weight


def load_with_adapters(base_model: str, specs: list[str]):
    """(model, tokenizer): the base with the given adapters applied at their strengths.

    One adapter at strength 1 is loaded as is. Otherwise the adapters are combined with PEFT's `cat`
    weighted adapter, which concatenates the ranks and so applies sum_i w_i * delta_W_i exactly.
    """
    from peft import PeftModel

    model, tokenizer = load_llm(base_model)
    parsed = [parse_lora_spec(s) for s in specs]
    if not parsed:
        return model.eval(), tokenizer
    names = [f"lora{i}" for i in range(len(parsed))]
    model = PeftModel.from_pretrained(model, str(parsed[0][0]), adapter_name=names[0])
    for name, (folder, _) in zip(names[1:], parsed[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    weights = [w for _, w in parsed]
    if len(parsed) > 1 or weights[0] != 1.0:
        for folder, _ in parsed:
            if json.loads((folder / "adapter_config.json").read_text()).get("use_dora"):
                raise LoraSpecError(f"{folder}: DoRA adapters cannot be mixed or scaled; use one at strength 1")
        model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
        model.set_adapter("mix")
    return model.eval(), tokenizer


def export_merged(base_model: str, specs: list[str], out: Path) -> Path:
    """A full transformers folder with the adapters baked into the weights (loads without peft)."""
    model, tokenizer = load_with_adapters(base_model, specs)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
