"""The LoRA tools that need the base model: merge into it, and extract a LoRA from a fine-tune."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_scripts.export.diffusers_lora import to_kohya_names
from lora_scripts.export.kohya import BASE_VERSION
from lora_scripts.export.lora_files import (
    LoraFormatError,
    LoraSet,
    read_lora,
    write_kohya_file,
    write_peft_folder,
)
from lora_scripts.export.sd_names import sd_name_map
from lora_scripts.models.detect import detect_model_type
from lora_scripts.tools.ops import ModuleReport, extract_deltas


def _sd_model(base: str, family: str, config_dir: Path | None, v_parameterization: bool | None = None):
    from lora_scripts.models.sd import load_sd

    return load_sd(base, family, config_dir, v_parameterization)


def export_merged(base_model: str, loras: list[tuple[Path, float]], out: Path) -> Path:
    """An LLM as a full transformers folder with the PEFT adapters baked into its weights (loads without peft)."""
    from lora_scripts.llm_generate import load_with_adapters

    model, tokenizer = load_with_adapters(base_model, loras)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def merge(base: str, loras: list[tuple[str, float]], out: Path, config_dir: Path | None = None,
          diffusers_out: Path | None = None, v_parameterization: bool | None = None) -> Path:
    """Bake LoRAs into the base at their strengths: an original-layout single file for SD (what the WebUIs
    load; its `modelspec.prediction_type` metadata says what the model predicts), a transformers folder for
    LLMs."""
    family = detect_model_type(base)
    if family == "llm":
        return export_merged(base, [(Path(p), w) for p, w in loras], Path(out))
    from safetensors.torch import save_file

    from lora_scripts.models.sd_convert import pipeline_to_original

    model = _sd_model(base, family, config_dir, v_parameterization)
    pipe = model.pipe
    names = sd_name_map(family, config_dir)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                  "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    with torch.no_grad():
        for path, weight in loras:
            lora = to_kohya_names(read_lora(path), config_dir)
            for key, m in lora.modules.items():
                if m.dora_scale is not None:
                    raise LoraFormatError(f"{path}: {key} is DoRA; merging DoRA is not supported yet")
                if key not in names:
                    raise LoraFormatError(f"{path}: {key} names no module of this {family} model")
                comp, mod_path = names[key]
                module = components[comp].get_submodule(mod_path)
                module.weight += (m.delta() * weight).to(module.weight.dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    predicts = {"v_prediction": "v", "epsilon": "epsilon"}[model.prediction_type]
    save_file(pipeline_to_original(pipe), str(out), metadata={"modelspec.prediction_type": predicts})
    if diffusers_out is not None:
        pipe.save_pretrained(diffusers_out)
    return out


def _linear_weights(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {name: mod.weight.detach() for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not any(s in name for s in skip)}


def extract(base: str, tuned: str, rank: int, out: Path, config_dir: Path | None = None) -> tuple[Path, list[ModuleReport]]:
    """A LoRA of `rank` approximating tuned - base, per linear/conv module (SVD)."""
    family = detect_model_type(base)
    if family == "llm":
        from lora_scripts.models.llm import load_llm

        b, _ = load_llm(base)
        t, _ = load_llm(tuned)
        skip = ("lm_head", "embed")  # vocabulary layers: full-rank by nature, not what a LoRA adapts
        modules, report = extract_deltas(_linear_weights(b, skip), _linear_weights(t, skip), rank)
        modules = {f"base_model.model.{k}": v for k, v in modules.items()}
        lora = LoraSet(modules, "peft")
        path = write_peft_folder(lora, Path(out), {"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"})
        return path, report
    # only the weights are compared: what the models predict does not matter (an SD 2.x file may not say)
    pb, pt = (_sd_model(m, family, config_dir, v_parameterization=False).pipe for m in (base, tuned))
    reverse = {v: k for k, v in sd_name_map(family, config_dir).items()}
    modules, report = {}, []
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        mb, mt = getattr(pb, comp, None), getattr(pt, comp, None)
        if mb is None:
            continue
        found, rep = extract_deltas(_linear_weights(mb), _linear_weights(mt), rank)
        for path, m in found.items():
            modules[reverse[(comp, path)]] = m
        report += rep
    if not modules:
        raise LoraFormatError(f"{tuned} does not differ from {base} in any linear or conv layer")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": BASE_VERSION[family],
            "ss_output_name": Path(out).stem}
    return write_kohya_file(LoraSet(modules, "kohya", meta), Path(out)), report
