"""Holding out eval samples: the same deterministic split for text pairs and images."""

from __future__ import annotations

import math
import random


def split_eval(samples: list, ratio: float, seed: int) -> tuple[list, list]:
    """(train, held out): floor(ratio x n) samples, at least one, picked by `seed`; order kept."""
    if ratio <= 0:
        return samples, []
    n_eval = max(1, math.floor(len(samples) * ratio))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
