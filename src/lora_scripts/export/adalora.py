"""An AdaLoRA adapter as the plain LoRA it computes, so it loads wherever LoRA files load.

peft's AdaLoRA layer adds B diag(E) A x alpha / (init_r + 1e-5) to a weight, with A (r x in), E (r x 1) and
B (out x r); the triplets its rank budget took away have E = 0. Leaving those out and folding E into the
down matrix gives, per module, an ordinary LoRA of the rank the module kept: ranks differ between modules,
which kohya files (one alpha per module), PEFT (rank_pattern / alpha_pattern) and diffusers all express.
peft's own AdaLoRA folder loads in peft alone.

Every module's alpha is written as init_r, one integer for the whole file, and what the update needs beyond
init_r / rank is folded into the up matrix: the exact update for every reader (alpha / rank x up @ down), in
any precision the file is saved in (an alpha like 16 x 5 / 12 has no exact fp16 form, while small integers
do), and no per-module alphas, which diffusers' kohya loader turns into patterns that match no module.
"""

from __future__ import annotations

from lora_scripts.export.lora_set import LoraModule, LoraSet


def is_adalora_layer(layer) -> bool:
    return hasattr(layer, "lora_E")


def adalora_module(layer, adapter: str = "default") -> LoraModule | None:
    """One AdaLoRA layer as a LoraModule of the rank it kept; None when every triplet is masked."""
    e = layer.lora_E[adapter].detach().float().cpu()  # (r, 1)
    keep = e.squeeze(1) != 0  # masked triplets are exactly 0: leaving them out changes no number
    rank = int(keep.sum())
    if rank == 0:
        return None
    a = layer.lora_A[adapter].detach().float().cpu()  # (r, in) or (r, in * kh * kw)
    b = layer.lora_B[adapter].detach().float().cpu()  # (out, r)
    init_r = float(layer.ranknum[adapter])
    scale = layer.scaling[adapter] / (init_r + 1e-5)  # as peft computes it
    down = (a * e)[keep]
    up = b[:, keep] * (scale * rank / init_r)  # readers apply init_r / rank
    weight = layer.get_base_layer().weight
    if weight.dim() == 4:  # a convolution: down as (r, in, kh, kw), up as a 1x1 (out, r, 1, 1)
        down = down.reshape(rank, *weight.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return LoraModule(down.contiguous(), up.contiguous(), init_r)


def adalora_peft_set(peft_model, adapter: str = "default") -> tuple[LoraSet, list[str]]:
    """The LoRA set of an AdaLoRA PeftModel under peft's module names, and the adapted modules whose every
    triplet was masked (left out of the set; a loader must not adapt them)."""
    modules, dropped = {}, []
    for name, layer in peft_model.named_modules():
        if is_adalora_layer(layer) and adapter in layer.lora_E:
            module = adalora_module(layer, adapter)
            if module is None:
                dropped.append(name)
            else:
                modules[name] = module
    return LoraSet(modules, "peft"), dropped


def plain_peft_config(dropped: list[str], **fields) -> dict:
    """The config fields a plain-LoRA PEFT folder of an AdaLoRA adapter needs beyond rank and alpha: the
    modules left at rank 0 excluded by name, so peft does not give them a fresh, empty adapter on load."""
    short = [n.removeprefix("base_model.model.") for n in dropped]
    return {**fields, "exclude_modules": short or None}

