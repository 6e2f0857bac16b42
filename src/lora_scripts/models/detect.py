"""Tell which model family `base_model` is, from its files alone (no weights are loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from lora_scripts.models.embedded import EMBEDDED_MODELS
from lora_scripts.safety import UnsafeFileError, check_safetensors

SD_UNET_PREFIX = "model.diffusion_model."
SDXL_MARKER = "conditioner.embedders.1."
SD2_MARKER = "cond_stage_model.model."  # OpenCLIP text encoder of SD 2.x


SD2_PREDICTION_UNKNOWN = (
    "{base}: an SD 2.x checkpoint that does not say what it predicts: the 768-v models (v2-1_768, "
    "v2-0_768) predict v, the 512-base ones noise. Set v_parameterization: true for a 768-v model or false "
    "for a 512-base one (generate and merge: --v-parameterization or --no-v-parameterization)"
)


class ModelTypeError(ValueError):
    pass


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header (checked for forged offsets), without reading the tensors."""
    try:
        header = check_safetensors(path)
    except UnsafeFileError as exc:
        raise ModelTypeError(str(exc)) from None
    return [k for k in header if k != "__metadata__"]


def sniff_from_keys(keys: list[str], origin: str) -> str:
    if any(k.startswith(SDXL_MARKER) for k in keys):
        return "sdxl"
    if any(k.startswith(SD_UNET_PREFIX) for k in keys):
        return "sd2" if any(k.startswith(SD2_MARKER) for k in keys) else "sd15"
    if any(".self_attn." in k or k.startswith(("model.layers.", "transformer.h.")) for k in keys):
        return "llm"
    raise ModelTypeError(f"{origin}: cannot tell the model family from its tensor names; set model_type")


def detect_model_type(base_model: str) -> str:
    """sd15 | sd2 | sdxl | llm, or ModelTypeError saying why it could not be told."""
    if base_model.lower() in EMBEDDED_MODELS:
        return "llm"
    path = Path(base_model).expanduser()
    if not path.exists():
        raise ModelTypeError(f"base_model {base_model}: no such file or folder (and not an embedded model name: "
                             f"{', '.join(EMBEDDED_MODELS)})")
    if path.is_dir():
        if (path / "model_index.json").exists():
            index = json.loads((path / "model_index.json").read_text())
            cls = str(index.get("_class_name", ""))
            if "XL" in cls:
                return "sdxl"
            # SD 2.x's UNet projects with Linear layers in its transformer blocks, SD1.x's with 1x1 convs (the
            # prediction type says nothing: SD 2.x 512-base predicts noise like SD1.x)
            unet = path / "unet" / "config.json"
            if unet.exists() and json.loads(unet.read_text()).get("use_linear_projection"):
                return "sd2"
            return "sd15"
        if (path / "config.json").exists():
            return "llm"
        ggufs = list(path.glob("*.gguf"))
        if ggufs:
            return "llm"
        raise ModelTypeError(f"{path}: folder has neither config.json (transformers) nor model_index.json (diffusers)")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "llm"
    if suffix == ".safetensors":
        return sniff_from_keys(safetensors_keys(path), str(path))
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        import torch

        # weights_only refuses pickles that would run code; mmap avoids reading the whole file.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return sniff_from_keys(list(state), str(path))
    raise ModelTypeError(f"{path}: unknown model file type '{suffix}'; expected .safetensors, .ckpt, .gguf or a folder")


def declared_prediction_type(base_model: str) -> str | None:
    """"v_prediction" or "epsilon" where the checkpoint itself says (a diffusers folder's scheduler config;
    a single file's `modelspec.prediction_type` metadata, or the `v_pred` marker key ComfyUI writes), else
    None. Read from headers only."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        sched = path / "scheduler" / "scheduler_config.json"
        return json.loads(sched.read_text()).get("prediction_type") if sched.exists() else None
    if path.suffix.lower() != ".safetensors" or not path.exists():
        return None
    try:
        header = check_safetensors(path)
    except UnsafeFileError:
        return None
    declared = str((header.get("__metadata__") or {}).get("modelspec.prediction_type", "")).lower()
    if "v_pred" in header or declared in ("v", "v_prediction"):
        return "v_prediction"
    return "epsilon" if declared in ("epsilon", "eps") else None
