"""What the SD loop computes once instead of every step, and the memory that frees.

- Latents: every image (and its flip) through the VAE once, on disk (data/sd_data.LatentCache).
- Text embeddings: every caption through the frozen text encoder(s) once, on disk beside the latents,
  keyed by caption and encoder weights, read back per step (a trained encoder, or shuffled/dropped
  captions, encode every step instead).
- Once both are built, the VAE and the frozen text encoders have nothing to do until the sample images:
  on a GPU they wait in RAM (`parked`) and come back for the samples only. kohya's tracker shows why it
  matters: SDXL's VAE and two text encoders kept resident in VRAM after caching are ~1.7 GB a 8-12 GB card
  needs for the UNet's activations.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.data import sd_data
from lora_scripts.models.embedded import cache_root
from lora_scripts.models.sd import SDModel, encode_prompts


def filled_latent_cache(cfg: TrainConfig, vae, samples: list[sd_data.Sample], eval_samples: list[sd_data.Sample],
                        events) -> sd_data.LatentCache:
    """Every training image (and its flip, with flip_aug) and every held-out image encoded once, or read back
    from an earlier run: afterwards the loop and the eval never need the VAE."""
    cache = sd_data.LatentCache(cache_root() / "latents", vae)
    t0 = time.perf_counter()
    for s in samples:
        for flip in ([False, True] if cfg.flip_aug else [False]):
            cache.get(s, flip)
    for s in eval_samples:
        cache.get(s, False)
    events.emit("info", message=f"latent cache: {cache.hits} reused, {cache.misses} encoded "
                f"in {time.perf_counter() - t0:.1f}s")
    return cache


class PromptEncoder:
    """Captions -> (hidden states, pooled or None). With frozen text encoders and fixed captions each
    caption is encoded once (`fill`), kept on disk and read back per step; a trained encoder (or shuffled or
    dropped captions) encodes every step."""

    def __init__(self, model: SDModel, trained_encoders: list | None, cached: bool):
        self.model, self.trained_encoders, self.cached = model, trained_encoders, cached
        self.folder = cache_root() / "text" / sd_data.module_fingerprint(*model.text_encoders)

    def path(self, caption: str) -> Path:
        return self.folder / f"{hashlib.sha256(caption.encode('utf-8')).hexdigest()[:40]}.safetensors"

    def fill(self, captions: list[str], batch: int = 16) -> tuple[int, int]:
        """Encode the captions not on disk yet; returns (reused, encoded)."""
        missing = [c for c in dict.fromkeys(captions) if sd_data.read_checked(self.path(c)) is None]
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(missing), batch):
            part = missing[i : i + batch]
            with torch.no_grad():
                hidden, pooled = encode_prompts(self.model, part)
            for k, c in enumerate(part):
                tensors = {"hidden": hidden[k].float().cpu().contiguous()}
                if pooled is not None:
                    tensors["pooled"] = pooled[k].float().cpu().contiguous()
                sd_data.write_checked(self.path(c), tensors)
        return len(set(captions)) - len(missing), len(missing)

    def __call__(self, captions: list[str]):
        if not self.cached:
            return encode_prompts(self.model, captions, self.trained_encoders)
        found = [sd_data.read_checked(self.path(c)) for c in captions]
        if any(f is None for f in found):  # a caption fill() never saw, or a file gone bad since: encode it now
            self.fill([c for c, f in zip(captions, found) if f is None])
            found = [sd_data.read_checked(self.path(c)) for c in captions]
        device = self.model.unet.device
        hidden = torch.stack([f["hidden"] for f in found]).to(device)
        pooled = torch.stack([f["pooled"] for f in found]).to(device) if "pooled" in found[0] else None
        return hidden, pooled


def build_caches(cfg: TrainConfig, model: SDModel, samples: list[sd_data.Sample], eval_samples: list[sd_data.Sample],
                 trained_encoders: list | None, events, device: torch.device):
    """(latent cache or None, prompt encoder, the parts parked off the device): the caches filled, then the
    VAE and the frozen text encoders parked (on a GPU: in RAM until the sample images)."""
    cache = filled_latent_cache(cfg, model.vae, samples, eval_samples, events) if cfg.cache_latents else None
    augment = cfg.shuffle_caption or cfg.caption_dropout_rate > 0
    conditioning = PromptEncoder(model, trained_encoders, cached=trained_encoders is None and not augment)
    if conditioning.cached:
        reused, encoded = conditioning.fill([s.item.caption or "" for s in samples + eval_samples])
        events.emit("info", message=f"text-embedding cache: {reused} reused, {encoded} encoded")
    parked = parts_to_park(model, cache is not None, conditioning.cached)
    park(parked, device)
    return cache, conditioning, parked


def parts_to_park(model: SDModel, latents_cached: bool, prompts_cached: bool) -> list[torch.nn.Module]:
    """The frozen parts the training steps never call once the caches are built: the VAE (latents cached) and
    the text encoders (embeddings cached, so frozen and with fixed captions)."""
    return ([model.vae] if latents_cached else []) + (list(model.text_encoders) if prompts_cached else [])


def park(parts: list[torch.nn.Module], device: torch.device) -> None:
    """Move `parts` off a GPU into RAM and give their memory back to the driver. On a CPU they stay where they
    are: RAM is the only memory there."""
    if device.type == "cpu" or not parts:
        return
    for part in parts:
        part.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def unparked(parts: list[torch.nn.Module], device: torch.device):
    """The parked parts on the training device for a while (sample images), then parked again."""
    if device.type == "cpu" or not parts:
        yield
        return
    for part in parts:
        part.to(device)
    try:
        yield
    finally:
        park(parts, device)
