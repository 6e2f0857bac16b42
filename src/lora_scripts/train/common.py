"""What both training loops build the same way: seeding, optimizer, schedule, and the precision of frozen weights.

The rest of what they share lives beside this: train/run.py (the run and its optimizer step),
train/checkpoint.py (checkpoints and resume), train/plan.py (step planning), train/errors.py.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

from lora_scripts.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# LoRA's up-projection weights, in peft's parameter names (Linear/Conv and Embedding layers)
LORA_B_NAMES = ("lora_B.", "lora_embedding_B.")


def lora_param_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, loraplus_lr_ratio: float | None
                      ) -> list[dict]:
    """The optimizer groups of one trained part: one group at `lr`, or with LoRA+ (loraplus_lr_ratio) the A
    matrices (and anything else trained, e.g. DoRA's magnitudes) at `lr` and the B matrices at
    `lr x ratio`, the split peft's create_loraplus_optimizer makes. Each group is named for the logs."""
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in named], "lr": lr, "name": "lora"}]
    b = [p for n, p in named if any(key in n for key in LORA_B_NAMES)]
    a = [p for n, p in named if not any(key in n for key in LORA_B_NAMES)]
    return [{"params": a, "lr": lr, "name": "lora_A"}, {"params": b, "lr": lr * loraplus_lr_ratio, "name": "lora_B"}]


def build_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    name = cfg.optimizer
    if name == "adamw":
        # foreach applies the update to all LoRA tensors in a few fused kernels instead of one per tensor.
        return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("optimizer adamw8bit needs `pip install bitsandbytes` and a CUDA GPU; use adamw") from None
        return bnb.optim.AdamW8bit(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            scale_parameter=False, relative_step=False, warmup_init=False,
        )
    raise ValueError(f"unknown optimizer {name}")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    kwargs = {"num_cycles": cfg.num_cycles} if cfg.scheduler == "cosine_with_restarts" else {}
    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
        num_training_steps=total_steps, scheduler_specific_kwargs=kwargs,
    )


def lora_inputs_uncast(model: torch.nn.Module, mixed_precision: str):
    """A context in which peft's LoRA layers take their input as it comes, in mixed-precision training.

    peft casts a LoRA layer's input to the dtype of its adapter weights (fp32) before the branch; under
    autocast the branch's first matmul casts it straight back to bf16/fp16. A bf16 activation thus made a
    round trip through fp32 in every adapted layer: two activation-sized copies forward and two backward,
    for bitwise the same result (bf16 -> fp32 -> bf16 is exact). Without autocast the cast is what makes
    the dtypes match, so it stays. Uses peft's own switch; the flag is put back on exit.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=mixed_precision != "no")


@contextmanager
def weights_swapped(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Inside: the named parameters hold `weights`; on exit their own values come back."""
    params = dict(model.named_parameters())
    own = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in own.items():
                params[n].copy_(t)


# The config's precision names (mixed_precision, save_precision) as torch dtypes
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def frozen_weights_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype frozen weights are kept in while training: autocast's under mixed precision, else None.

    Not for DoRA either: it reads the base weights themselves (their norms), which must stay exact. Nor for
    PiSSA/OLoRA: their residual weights are no longer the model file's, from which the cast is undone.
    """
    if cfg.mixed_precision == "no" or cfg.lora_type == "dora" or cfg.mutates_base:
        return None
    return DTYPES[cfg.mixed_precision]

