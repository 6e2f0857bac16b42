"""The one rule for a LoRA's strength: delta W = scale x up @ down.

Every reader of the kohya/A1111 format (A1111, ComfyUI, diffusers, kohya) computes scale = alpha / rank
from the file's `alpha`; peft uses alpha / rank, or alpha / sqrt(rank) with rsLoRA. A file written for
those readers therefore carries the alpha that gives peft's scale over the rank, and its `ss_network_alpha`
says the same number, or tools that read the metadata apply another strength.
"""

from __future__ import annotations

import math


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """peft's scale for an adapter of `rank` trained with `alpha`; 1 where a file has no alpha."""
    if alpha is None:
        return 1.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank  # as peft computes it, to the last bit


def file_alpha(alpha: float, rank: int, rslora: bool = False) -> float:
    """The alpha to write into a file read as alpha / rank, so that readers apply `lora_scale`."""
    return lora_scale(alpha, rank, rslora) * rank
