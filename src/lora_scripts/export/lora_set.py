"""One in-memory form of a LoRA, whatever file it came from or goes to.

`LoraSet` maps a module name to (down, up, alpha[, dora_scale]): kohya names (`lora_unet_...`) for Stable
Diffusion, peft module paths (`base_model.model.model.layers.0.self_attn.q_proj`) for LLMs. delta W of a
module is up @ down x scale (convolutions flattened), scale by export/scale.py, as every reader applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_scripts.export.scale import lora_scale


@dataclass
class LoraModule:
    down: torch.Tensor  # (r, in) or (r, in, k, k)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None  # None: the file had no alpha (readers then use scale 1)
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)  # a file's alpha is read over the rank (export/scale.py)

    def delta(self) -> torch.Tensor:
        """ΔW in the weight's own shape, in float32."""
        up, down = self.up.float(), self.down.float()
        d = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            d = d.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
        return d * self.scale


@dataclass
class LoraSet:
    modules: dict[str, LoraModule]
    format: str  # kohya | diffusers | peft
    metadata: dict[str, str] = field(default_factory=dict)
    peft_config: dict | None = None
    path: Path | None = None

    @property
    def family(self) -> str:
        names = list(self.modules)
        if self.format == "peft":
            return "llm"
        if any(n.startswith(("lora_te2_", "lora_te1_")) or "_input_blocks_" in n or "_label_emb_" in n for n in names):
            return "sdxl"
        version = self.metadata.get("ss_base_model_version", "")
        if version.startswith("sd_v2") or self.metadata.get("ss_v2") == "True":
            return "sd2"
        return "sd15"
