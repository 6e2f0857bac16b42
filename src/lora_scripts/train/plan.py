"""How many batches and optimizer steps a run makes: plain arithmetic, imported by the preflight too (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_scripts.config import TrainConfig


@dataclass
class StepPlan:
    batches_per_rank: int  # micro-batches each process runs per epoch
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    epochs: int


def plan_steps(n_items: int, cfg: TrainConfig, world: int = 1) -> StepPlan:
    """How many batches and optimizer steps a run makes. With several processes the last partial batch is
    dropped so every process runs the same number of batches (DDP would otherwise wait forever)."""
    batches = n_items // cfg.batch_size if world > 1 else math.ceil(n_items / cfg.batch_size)
    per_rank = batches // world
    steps_per_epoch = math.ceil(per_rank / cfg.gradient_accumulation_steps) if per_rank else 0
    total = cfg.max_train_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
    return StepPlan(per_rank, steps_per_epoch, total, epochs)

