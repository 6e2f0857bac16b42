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

    def minus(self, start: LoraModule) -> LoraModule:
        """self - start as one LoRA of the two ranks together: the update of a PiSSA/OLoRA adapter against the
        original weight (its frozen weight was the original minus `start`). down stacks both; up stacks self's
        and -start's, each at its own scale over the new one (1 when ranks and alphas agree: exact)."""
        rank = self.rank + start.rank
        alpha = self.scale * rank  # the new alpha keeps self's scale
        up = torch.cat([self.up, -start.up * (start.scale / self.scale)], dim=1)
        return LoraModule(torch.cat([self.down, start.down], dim=0), up, alpha)

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

    def copy(self) -> LoraSet:
        """The same LoRA with tensors of its own (a live model's LoraSet shares the parameters' storage)."""
        modules = {k: LoraModule(m.down.clone(), m.up.clone(), m.alpha,
                                 None if m.dora_scale is None else m.dora_scale.clone())
                   for k, m in self.modules.items()}
        return LoraSet(modules, self.format, dict(self.metadata), self.peft_config, self.path)

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
