"""CLIP auto-labelling: images → comma-separated prompts in metadata.csv, interrogator style.

For each image, CLIP scores the shipped phrase lists (resources/phrases/*.txt: subjects, mediums, art
styles, lighting, colours, composition, mood, quality) plus the user's own phrases. The best phrase of
each list is a candidate; candidates whose cosine similarity reaches the threshold are written most
relevant first, up to --max-phrases. An optional image-to-text captioner (BLIP, GIT, Florence-2, ...)
writes a sentence that leads the prompt, as CLIP-Interrogator does.

People's captions are never lost: existing rows are kept and only unlabelled images are labelled, unless
--overwrite (which keeps the old file as metadata.csv.bak). The CSV is rewritten atomically after every
batch, so an interrupted run keeps what it did and a rerun continues without duplicating rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from lora_scripts.data.images import CaptionFileError, open_rgb, read_caption_csv, scan_images

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CATEGORIES = ["subjects", "mediums", "styles", "lighting", "colors", "composition", "mood", "quality"]
PROGRESS_SUFFIX = ".labeling.json"


class LabelError(RuntimeError):
    pass


def read_phrase_file(path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def shipped_phrases() -> dict[str, list[str]]:
    folder = resources.files("lora_scripts") / "resources" / "phrases"
    return {name: read_phrase_file(folder / f"{name}.txt") for name in CATEGORIES}


def resolve_model_folder(name: str | None, what: str, default: str | None = None) -> Path:
    """A local folder for `name`: a path, or a repo id already in the local Hugging Face cache. Never downloads."""
    name = name or default
    if name is None:
        raise LabelError(f"no {what} given")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LabelError(f"{what} folder {path} has no config.json; it must be a transformers model folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise LabelError(
            f"no {what} '{name}' is available offline.\n"
            f"Give a local folder with --{'clip-model' if what == 'CLIP model' else 'captioner'} DIR: a transformers "
            f"model folder (config.json, model.safetensors, preprocessor_config.json, tokenizer files), e.g. "
            f"one saved with `CLIPModel.from_pretrained('{DEFAULT_CLIP}').save_pretrained(DIR)` plus "
            f"`CLIPProcessor....save_pretrained(DIR)` on a machine with internet, then copied here. "
            f"A model already in the Hugging Face cache (~/.cache/huggingface/hub) is found by its id. "
            f"Nothing is downloaded."
        ) from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


class Captioner:
    """An image-to-text model (BLIP, GIT, Florence-2, ...) that writes one sentence per image."""

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


def compose_prompt(sentence: str | None, phrases: list[str], trigger: str | None) -> str:
    parts = ([trigger] if trigger else []) + ([sentence] if sentence else []) + phrases
    seen, out = set(), []
    for p in parts:  # a phrase the sentence already holds is not repeated
        if p and p.lower() not in seen and not (sentence and p.lower() in sentence.lower() and p != sentence):
            seen.add(p.lower())
            out.append(p)
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------------
# The CSV: read, merge, write atomically
# ---------------------------------------------------------------------------------------------------


def write_csv_atomic(path: Path, rows: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "prompt"])
    for name, prompt in rows.items():
        w.writerow([name, prompt])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class LabelResult:
    labelled: dict[str, str] = field(default_factory=dict)  # filename -> prompt written this run
    kept: int = 0  # existing rows left as they were
    skipped: dict[str, str] = field(default_factory=dict)  # filename -> why it could not be read
    details: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # chosen phrases and scores


def label_folder(
    input_dir: Path,
    output: Path | None = None,
    clip_model: str | None = None,
    captioner: str | None = None,
    trigger: str | None = None,
    max_phrases: int = 8,
    threshold: float = 0.18,
    extra_phrases: Path | None = None,
    sidecar: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
    interrogator: ClipInterrogator | None = None,
) -> LabelResult:
    input_dir = Path(input_dir)
    output = Path(output) if output else input_dir / "metadata.csv"
    if not input_dir.is_dir():
        raise LabelError(f"--input {input_dir}: not a folder")
    items = scan_images(input_dir)
    if not items:
        raise LabelError(f"--input {input_dir}: no images (.jpg, .png, .webp, .bmp) found")

    existing: dict[str, str] = {}
    if output.exists():
        try:
            existing = read_caption_csv(output).captions
        except CaptionFileError as exc:
            raise LabelError(f"{exc}\nFix or move the file; it is never overwritten without --overwrite.") from None

    progress_file = output.with_name(output.name + PROGRESS_SUFFIX)
    done_this_pass: set[str] = set()
    if overwrite and not dry_run:
        if progress_file.exists():  # an interrupted --overwrite run: continue it, keep the first backup
            done_this_pass = set(json.loads(progress_file.read_text())["done"])
        elif output.exists():
            shutil.copy2(output, output.with_name(output.name + ".bak"))
        rows = {k: v for k, v in existing.items() if k in done_this_pass}
    else:
        rows = dict(existing)

    result = LabelResult(kept=len(rows) if not overwrite else 0)
    todo = [it for it in items if it.key not in rows]
    if not todo:
        return result

    dev = pick_device(device)
    extra = read_phrase_file(Path(extra_phrases)) if extra_phrases else []
    if interrogator is None:
        interrogator = ClipInterrogator.load(resolve_model_folder(clip_model, "CLIP model", DEFAULT_CLIP), dev, extra)
    cap = Captioner(resolve_model_folder(captioner, "captioner"), dev) if captioner else None

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="labelling", unit="img", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for i in range(0, len(todo), batch_size):
        chunk, images = [], []
        for it in todo[i : i + batch_size]:
            try:
                images.append(open_rgb(it.path))
                chunk.append(it)
            except Exception as exc:  # any decoder failure: skip the file, report it at the end
                result.skipped[it.key] = f"{type(exc).__name__}: {exc}"
        if chunk:
            sims = interrogator.similarities(images)
            sentences = cap.caption(images) if cap else [None] * len(chunk)
            for it, row, sentence in zip(chunk, sims, sentences):
                chosen = interrogator.choose(row, threshold, max_phrases)
                prompt = compose_prompt(sentence, [c[0] for c in chosen], trigger)
                result.labelled[it.key] = prompt
                result.details[it.key] = chosen
                rows[it.key] = prompt
                if sidecar and not dry_run:
                    txt = it.path.with_suffix(".txt")
                    if overwrite or not txt.exists():
                        write_text_atomic(txt, prompt)
        if not dry_run:
            write_csv_atomic(output, rows)
            if overwrite:
                write_text_atomic(progress_file, json.dumps({"done": sorted(rows)}))
        bar.update(len(todo[i : i + batch_size]))
        bar.set_postfix({"img/s": f"{bar.n / (time.perf_counter() - start):.1f}"}, refresh=False)
    bar.close()
    if overwrite and progress_file.exists():
        progress_file.unlink()
    return result
