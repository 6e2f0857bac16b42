"""The diffusers LoRA file (`pytorch_lora_weights.safetensors`), loadable with `pipe.load_lora_weights`.

The adapter metadata (rank, alpha, targets) is passed explicitly: without it diffusers writes no alpha
and a reload with lora_alpha != rank comes back at the wrong strength (STACK-NOTES).
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_diffusers_lora(folder: Path, model, with_text_encoders: bool, dtype: torch.dtype) -> Path:
    from peft.utils import get_peft_model_state_dict

    def layers(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(module).items()}

    kwargs = {
        "unet_lora_layers": layers(model.unet),
        "unet_lora_adapter_metadata": model.unet.peft_config["default"].to_dict(),
    }
    if with_text_encoders:
        names = ["text_encoder", "text_encoder_2"]
        for name, te in zip(names, model.text_encoders):
            kwargs[f"{name}_lora_layers"] = layers(te)
            kwargs[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
    type(model.pipe).save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    return Path(folder) / "pytorch_lora_weights.safetensors"
