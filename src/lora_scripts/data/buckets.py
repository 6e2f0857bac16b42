"""Aspect-ratio buckets: which (width, height) each image trains at, and how many batches an epoch holds.

Plain arithmetic and image headers (no torch), so the preflight plans the same steps the loop runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with width*height <= resolution², both multiples of `step`."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * 4:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            buckets.add((w, h))
        w += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def image_bucket(path: Path, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image as it will be seen: its header's size, sides swapped by an EXIF rotation."""
    with Image.open(path) as im:
        size = im.size
        orientation = (im.getexif() or {}).get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # EXIF rotation by 90 degrees swaps the sides
        size = (size[1], size[0])
    return nearest_bucket(size, buckets)


def views_per_bucket(buckets: list[tuple[int, int]], repeats: list[int]) -> dict[tuple[int, int], int]:
    """Image views per epoch in each bucket: `buckets[i]` is image i's bucket, seen `repeats[i]` times."""
    views: dict[tuple[int, int], int] = {}
    for bucket, r in zip(buckets, repeats):
        views[bucket] = views.get(bucket, 0) + r
    return views


def batches_per_epoch(views_per_bucket: dict[tuple[int, int], int], batch_size: int) -> int:
    """Every batch comes from one bucket, so each bucket's last batch may be partial: it is kept, so every
    image is seen once per epoch (times its repeats)."""
    return sum(math.ceil(views / batch_size) for views in views_per_bucket.values())
