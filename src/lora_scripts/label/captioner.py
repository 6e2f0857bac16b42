"""An image-to-text captioner (BLIP, GIT, ...) whose sentence leads a prompt, as CLIP-Interrogator does."""

from __future__ import annotations

from pathlib import Path

import torch


class Captioner:
    """An image-to-text model (BLIP, GIT, ...; captioning without a task prompt) that writes one sentence per image."""

    def __init__(self, folder: Path, device: torch.device, max_new_tokens: int = 30):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
        self.model = self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def caption(self, images: list) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()).strip(" ,.") for t in texts]
