"""The diffusers LoRA file (`pytorch_lora_weights.safetensors`), loadable with `pipe.load_lora_weights`.

Keys are `<component>.<module path>.lora_A/B.weight` (component: unet, text_encoder, text_encoder_2), and
each component's peft config (rank, alpha, rank/alpha patterns) is written as adapter metadata: without
it diffusers writes no alpha and a reload with lora_alpha != rank comes back at the wrong strength
(STACK-NOTES).

One writer, `write_diffusers_file`, takes {component: (tensors, peft config)}. Its two sources:
`diffusers_components_of_model` (a live peft model, at export after training: its own peft config, DoRA
magnitudes included) and `diffusers_components` (a LoraSet in kohya names, for `convert`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_scripts.export.adalora import adalora_peft_set
from lora_scripts.export.kohya import BASE_VERSION
from lora_scripts.export.lora_files import LoraFormatError, peft_layout
from lora_scripts.export.lora_set import LoraSet
from lora_scripts.export.sd_names import sd_name_map

Components = dict[str, tuple[dict[str, torch.Tensor], dict]]
TE_COMPONENTS = ["text_encoder", "text_encoder_2"]


def write_diffusers_file(components: Components, folder: Path, family: str) -> Path:
    """`folder/pytorch_lora_weights.safetensors` through diffusers' own serializer (what it reads back)."""
    import diffusers

    pipe_cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    kwargs = {}
    for comp, (tensors, config) in components.items():
        kwargs[f"{comp}_lora_layers"] = tensors
        kwargs[f"{comp}_lora_adapter_metadata"] = config
    Path(folder).mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def diffusers_components_of_model(unet, text_encoders: list, dtype: torch.dtype) -> Components:
    """The trained adapters of a live model, in `dtype`, each with the peft config it was trained with."""
    from peft.utils import get_peft_model_state_dict

    def component(module) -> tuple[dict[str, torch.Tensor], dict]:
        if module.peft_config["default"].peft_type == "ADALORA":  # as the plain LoRA it computes
            modules = adalora_peft_set(module)[0].modules
            tensors, fields = peft_layout(modules)
            # the modules by full path: diffusers warns about any targeted module without tensors, and a
            # module that lost every triplet has none
            return {k: v.to(dtype) for k, v in tensors.items()}, {**fields, "target_modules": sorted(modules)}
        tensors = {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(module).items()}
        return tensors, module.peft_config["default"].to_dict()

    return {"unet": component(unet), **{name: component(te) for name, te in zip(TE_COMPONENTS, text_encoders)}}


def diffusers_components(lora: LoraSet, config_dir: Path | None = None) -> Components:
    """A kohya-named LoraSet in diffusers naming, with per-component ranks and alphas."""
    if any(m.dora_scale is not None for m in lora.modules.values()):
        raise LoraFormatError("DoRA magnitudes have no place in the diffusers LoRA format; keep the kohya file")
    names = sd_name_map(lora.family, config_dir)
    by_component: dict[str, dict] = {}
    for key, m in lora.modules.items():
        if key not in names:
            raise LoraFormatError(f"{key}: no such module in a {lora.family} model (ComfyUI would report "
                                  f"'lora key not loaded'); pass --model-config-dir for a non-standard architecture")
        comp, path = names[key]
        by_component.setdefault(comp, {})[path] = m
    return {comp: peft_layout(mods) for comp, mods in by_component.items()}


def to_kohya_names(lora: LoraSet, config_dir: Path | None = None) -> LoraSet:
    """A diffusers-format SD LoRA renamed to kohya keys (tensors untouched)."""
    if lora.format == "kohya":
        return lora
    if lora.format != "diffusers":
        raise LoraFormatError(f"a {lora.format} adapter has no kohya form (kohya files are for Stable Diffusion)")
    family = _diffusers_family(lora)
    reverse = {f"{comp}.{path}": k for k, (comp, path) in sd_name_map(family, config_dir).items()}
    modules = {}
    for name, m in lora.modules.items():
        if name not in reverse:
            raise LoraFormatError(f"{name}: no such module in a {family} model; pass --model-config-dir for a "
                                  "non-standard architecture")
        modules[reverse[name]] = m
    meta = {"ss_base_model_version": BASE_VERSION[family],
            "ss_network_module": "networks.lora"}
    return LoraSet(modules, "kohya", meta)


def _diffusers_family(lora: LoraSet) -> str:
    if any(n.startswith("text_encoder_2.") for n in lora.modules):
        return "sdxl"
    cfg = json.loads(lora.metadata.get("lora_adapter_metadata", "{}"))
    if any("add_embedding" in n for n in lora.modules) or "sdxl" in json.dumps(cfg).lower():
        return "sdxl"
    return "sd15"
