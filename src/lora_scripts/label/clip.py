"""CLIP interrogation: which of the shipped (and the user's) phrases describe an image, with their scores."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CATEGORIES = ["subjects", "mediums", "styles", "lighting", "colors", "composition", "mood", "quality"]


def read_phrase_file(path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def shipped_phrases() -> dict[str, list[str]]:
    folder = resources.files("lora_scripts") / "resources" / "phrases"
    return {name: read_phrase_file(folder / f"{name}.txt") for name in CATEGORIES}


@dataclass
class Phrase:
    text: str
    category: str


@dataclass
class ClipInterrogator:
    """CLIP model + processor and the phrase bank's normalised text embeddings."""

    model: object
    processor: object
    device: torch.device
    phrases: list[Phrase]
    text_features: torch.Tensor  # (P, D), unit length

    @classmethod
    def load(cls, folder: Path, device: torch.device, extra: list[str] | None = None) -> ClipInterrogator:
        from transformers import CLIPModel, CLIPProcessor

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        bank = [Phrase(t, cat) for cat, texts in shipped_phrases().items() for t in texts]
        bank += [Phrase(t, "extra") for t in (extra or [])]
        feats = []
        with torch.no_grad():
            for i in range(0, len(bank), 256):
                tok = processor.tokenizer([p.text for p in bank[i : i + 256]], padding=True, truncation=True,
                                          return_tensors="pt").to(device)
                feats.append(_unit(_features(model.get_text_features(**tok))))
        return cls(model, processor, device, bank, torch.cat(feats))

    @torch.no_grad()
    def similarities(self, images: list) -> torch.Tensor:
        """(N, P) cosine similarity of each image with each phrase."""
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        img = _unit(_features(self.model.get_image_features(pixel_values=pixels)))
        return (img @ self.text_features.T).float().cpu()

    def choose(self, sims: torch.Tensor, threshold: float, max_phrases: int) -> list[tuple[str, float]]:
        """The best phrase of each category whose similarity reaches `threshold`, best first, at most max_phrases."""
        best: dict[str, tuple[str, float]] = {}
        for idx, phrase in enumerate(self.phrases):
            score = float(sims[idx])
            key = phrase.category if phrase.category != "extra" else f"extra:{phrase.text}"
            if key not in best or score > best[key][1]:
                best[key] = (phrase.text, score)
        chosen = sorted((c for c in best.values() if c[1] >= threshold), key=lambda c: -c[1])
        return chosen[:max_phrases]


def _features(out) -> torch.Tensor:
    # transformers 5 may return a model output object instead of a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
