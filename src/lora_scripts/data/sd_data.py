"""Stable Diffusion training data: aspect-ratio buckets, caption augmentation and the on-disk latent cache.

Images are never squashed or cropped to squares: each goes to the bucket (width, height in 64-px steps,
about resolution² pixels) nearest its aspect ratio, is scaled to cover it and cropped by the few pixels
that remain. Latents are cached per (image content, bucket, flip, VAE) so a second run or a resume
skips the VAE entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_scripts.data.buckets import image_bucket, make_buckets
from lora_scripts.data.images import ImageItem, open_rgb
from lora_scripts.hashing import sha256_file


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket, then centre-crop the overhang (at most a few % of one side)."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    nw, nh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def augment_caption(caption: str, rng: random.Random, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


@dataclass
class Sample:
    item: ImageItem
    bucket: tuple[int, int]
    image_hash: str


def build_samples(items: list[ImageItem], resolution: int) -> tuple[list[Sample], dict[tuple[int, int], int]]:
    """Assign every image its bucket; returns the samples and the bucket table (bucket -> image count)."""
    buckets = make_buckets(resolution)
    samples, table = [], defaultdict(int)
    for it in items:
        bucket = image_bucket(it.path, buckets)
        samples.append(Sample(it, bucket, sha256_file(it.path)))
        table[bucket] += 1
    return samples, dict(sorted(table.items()))


def epoch_batches(samples: list[Sample], repeats: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample indices, every batch from one bucket (its last one partial); a pure function of
    (seed, epoch). There are `buckets.batches_per_epoch` of them."""
    rng = random.Random(seed * 100_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for idx, (s, r) in enumerate(zip(samples, repeats)):
        by_bucket[s.bucket] += [idx] * r
    batches = []
    for bucket in sorted(by_bucket):
        views = by_bucket[bucket]
        rng.shuffle(views)
        batches += [views[i : i + batch_size] for i in range(0, len(views), batch_size)]
    rng.shuffle(batches)
    return batches


class LatentCache:
    """Latents on disk, keyed by image content + bucket + flip + VAE; each file carries its checksum."""

    def __init__(self, root: Path, vae) -> None:
        self.vae = vae
        self.folder = Path(root) / module_fingerprint(vae)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, s: Sample, flip: bool) -> Path:
        w, h = s.bucket
        return self.folder / f"{s.image_hash[:40]}_{w}x{h}{'_flip' if flip else ''}.safetensors"

    def get(self, s: Sample, flip: bool) -> torch.Tensor:
        path = self.path(s, flip)
        found = read_checked(path) if path.exists() else None
        if found is not None:
            self.hits += 1
            return found["latent"]
        self.misses += 1
        latent = encode_image(self.vae, s, flip)
        write_checked(path, {"latent": latent})
        return latent


def _tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def write_checked(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A cache file with the checksum of its tensors, written whole or not at all (each process its own
    temporary file: ranks may write the same entry)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"sha256": _tensors_sha(tensors)})
    tmp.replace(path)


def read_checked(path: Path) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when it is missing, unreadable, not finite or fails its checksum (the
    caller then rebuilds it)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            expected = (fh.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except Exception:
        return None
    if expected is None or _tensors_sha(tensors) != expected or not all(torch.isfinite(t).all() for t in tensors.values()):
        return None
    return tensors


def module_fingerprint(*modules) -> str:
    """Which weights these are, cheaply: their configs and three parameter tensors each (cache folders)."""
    h = hashlib.sha256()
    for m in modules:
        config = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)  # transformers / diffusers
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        params = list(m.parameters())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_image(vae, s: Sample, flip: bool) -> torch.Tensor:
    """(4, h/8, w/8) mean latent of the image in its bucket, scaled by the VAE's factor; fp32 VAE."""
    img = fit_to_bucket(open_rgb(s.item.path), s.bucket)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = to_tensor(img)[None].to(vae.device, dtype=vae.dtype)
    latent = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
    latent = latent.float().cpu()
    if not torch.isfinite(latent).all():
        raise FloatingPointError(f"{s.item.key}: the VAE produced NaN/inf latents (an fp16 VAE overflow?)")
    return latent
