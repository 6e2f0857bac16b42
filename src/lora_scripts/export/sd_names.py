"""Which SD module a kohya LoRA key means, worked out from the model's own module list.

kohya names replace every '.' of a module path with '_', which cannot be undone by string rules alone
(`transformer_blocks`, `to_out_0`). Building the UNet and text encoders on the meta device from their
config (no memory, no weights) lists every real module path; each is turned into its kohya name once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from lora_scripts.export.kohya import kohya_name
from lora_scripts.models.sd_configs import config_folder
from lora_scripts.models.sd_convert import unet_module_to_original, unet_prefix_map

TE_PREFIX = {"sd15": ["lora_te"], "sd2": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}
TE_COMPONENTS = ["text_encoder", "text_encoder_2"]


@lru_cache(maxsize=8)
def _name_map(family: str, config_dir: str) -> dict[str, tuple[str, str]]:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = Path(config_dir)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    names: dict[str, tuple[str, str]] = {}
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(unet_cfg)
        pm = unet_prefix_map(dict(unet.config)) if family == "sdxl" else None
        for path, mod in unet.named_modules():
            if hasattr(mod, "weight") and path:
                sgm = unet_module_to_original(path, pm) if pm is not None else path
                names[kohya_name("lora_unet", sgm)] = ("unet", path)
        for prefix, comp in zip(TE_PREFIX[family], TE_COMPONENTS):
            cfg_file = folder / comp / "config.json"
            if not cfg_file.exists():
                continue
            te_cfg = json.loads(cfg_file.read_text())
            cls = getattr(transformers, (te_cfg.get("architectures") or ["CLIPTextModel"])[0])
            te = cls(transformers.CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k != "architectures"}))
            for path, mod in te.named_modules():
                if hasattr(mod, "weight") and path:
                    full = path if path.startswith("text_model.") else f"text_model.{path}"
                    names[kohya_name(prefix, full)] = (comp, path)
    return names


def sd_name_map(family: str, config_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """kohya key → (component, module path) for every weight-holding module of the model family."""
    return _name_map(family, str(config_dir or config_folder(family)))
