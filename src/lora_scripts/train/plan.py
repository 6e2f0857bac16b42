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


def plan_steps(n_items: int, cfg: TrainConfig, world: int = 1, n_batches: int | None = None) -> StepPlan:
    """How many batches and optimizer steps a run makes.

    `n_batches`: an epoch's batches when the family forms them itself (SD: one bucket per batch, each
    bucket's last batch partial, `buckets.batches_per_epoch`); every one is run, and with several processes
    the first ones are run twice to give every process the same count (`share_batches`). Without it
    (LLM), batches of `batch_size` over `n_items`; with several processes the last partial batch is dropped
    so every process runs the same number (DDP would otherwise wait forever)."""
    if n_batches is not None:
        per_rank = math.ceil(n_batches / world)
    else:
        batches = n_items // cfg.batch_size if world > 1 else math.ceil(n_items / cfg.batch_size)
        per_rank = batches // world
    steps_per_epoch = math.ceil(per_rank / cfg.gradient_accumulation_steps) if per_rank else 0
    total = cfg.max_train_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
    return StepPlan(per_rank, steps_per_epoch, total, epochs)


def share_batches(batches: list, per_rank: int, world: int, rank: int) -> list:
    """This process's batches of an epoch: every `world`-th, the list first filled up to per_rank x world
    with its own first batches (as torch's DistributedSampler pads), so no batch is dropped."""
    needed = per_rank * world
    filled = (batches * math.ceil(needed / max(len(batches), 1)))[:needed] if batches else []
    return filled[rank::world]
