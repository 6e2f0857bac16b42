"""Image datasets: find images and captions, check every file, and open images the same way everywhere.

Captions come from `metadata.csv` (`filename,prompt`, the format `tools/auto_label.py` writes) and/or
kohya-style sidecar `.txt` files; the CSV wins where both exist. kohya's `N_name` sub-folders repeat
their images N times per epoch.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_scripts.data.split import split_eval

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
MAX_ASPECT = 4.0  # beyond 1:4 no SD bucket fits without cropping away most of the image


class CaptionFileError(ValueError):
    pass


@dataclass
class ImageItem:
    path: Path
    key: str  # path relative to the data folder, with '/' separators: the name metadata.csv uses
    repeats: int = 1
    caption: str | None = None


@dataclass
class CaptionTable:
    captions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # row-level issues (duplicates, empty captions)


def read_caption_csv(path: Path) -> CaptionTable:
    """`filename,prompt` rows. A BOM, quoted commas and CRLF are handled by the csv module + utf-8-sig."""
    table = CaptionTable()
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            name_col = next((c for c in ("filename", "file_name", "image") if c in columns), None)
            text_col = next((c for c in ("prompt", "caption", "text") if c in columns), None)
            if name_col is None or text_col is None:
                raise CaptionFileError(
                    f"{path}: needs the header 'filename,prompt' (found: {', '.join(columns) or 'no header'})"
                )
            for row_no, row in enumerate(reader, start=2):
                name = (row.get(name_col) or "").strip().replace("\\", "/")
                caption = (row.get(text_col) or "").strip()
                if not name:
                    table.problems.append(f"{path}:{row_no}: row has no filename")
                    continue
                if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
                    # never read outside the dataset folder, whatever a downloaded CSV says
                    raise CaptionFileError(f"{path}:{row_no}: filename {name!r} points outside the dataset folder; "
                                           "use a path relative to it")
                if name in table.captions:
                    table.problems.append(f"{path}:{row_no}: {name} is listed twice; the first row is used")
                    continue
                if not caption:
                    table.problems.append(f"{path}:{row_no}: {name} has an empty caption")
                table.captions[name] = caption
    except UnicodeDecodeError as exc:
        raise CaptionFileError(f"{path}: not UTF-8 text (bad byte at {exc.start}); save it as UTF-8") from None
    return table


def scan_images(folder: Path) -> list[ImageItem]:
    """Every image under `folder`; images in `N_name` sub-folders get N repeats."""
    items = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        rel = p.relative_to(folder)
        repeats = 1
        if len(rel.parts) > 1:
            m = REPEAT_DIR.match(rel.parts[0])
            if m:
                repeats = max(1, int(m.group(1)))
        items.append(ImageItem(path=p, key=rel.as_posix(), repeats=repeats))
    return items


def read_sidecar(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if not txt.exists():
        return None
    raw = txt.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise CaptionFileError(f"{txt}: not UTF-8 text; save it as UTF-8") from None


def open_rgb(path: Path) -> Image.Image:
    """Decode fully and return RGB: EXIF orientation applied, alpha flattened on white, CMYK/16-bit converted."""
    with Image.open(path) as im:
        im.load()  # decode now so a truncated file fails here, not mid-training
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA"):
            background = Image.new("RGB", im.size, (255, 255, 255))
            background.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
            return background
        return im.convert("RGB")


def check_image(path: Path, resolution: int) -> tuple[str | None, str | None]:
    """(error, note): error when the file cannot be used; note for conversions the loader will make."""
    size = path.stat().st_size
    if size == 0:
        return "zero-byte file", None
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            im.load()
    except UnidentifiedImageError:
        return "not an image (or an unsupported format)", None
    except (OSError, SyntaxError) as exc:
        return f"corrupt or truncated ({exc})", None
    aspect = max(w, h) / max(min(w, h), 1)
    if aspect > MAX_ASPECT:
        return f"{w}x{h} has aspect ratio {aspect:.0f}:1; SD buckets go up to {MAX_ASPECT:.0f}:1 (crop it first)", None
    if min(w, h) < 8:
        return f"{w}x{h} is too small to train on", None
    notes = []
    if mode == "CMYK":
        notes.append("CMYK, converted to RGB")
    elif mode.startswith("I"):
        notes.append("16-bit, converted to 8-bit")
    elif mode in ("RGBA", "LA", "P"):
        notes.append("has transparency, flattened on white")
    elif mode == "L":
        notes.append("grayscale, converted to RGB")
    if w * h < (resolution * resolution) / 4:
        notes.append(f"{w}x{h} is well below {resolution}px and will be upscaled (blurry)")
    return None, "; ".join(notes) or None


def load_captioned_images(folder: Path, metadata_path: Path | None = None, trigger: str | None = None) -> list[ImageItem]:
    """The training set: every image with its caption (metadata.csv wins over a sidecar .txt).

    Raises CaptionFileError listing every image without a caption; run `lora-scripts validate` for the full
    report of unreadable files.
    """
    folder = Path(folder)
    meta = Path(metadata_path) if metadata_path else folder / "metadata.csv"
    table = read_caption_csv(meta) if meta.exists() else CaptionTable()
    items, missing = [], []
    for it in scan_images(folder):
        caption = table.captions.get(it.key, table.captions.get(it.path.name))
        if caption is None:
            caption = read_sidecar(it.path)
        if not caption:
            missing.append(it.key)
            continue
        it.caption = f"{trigger}, {caption}" if trigger else caption
        items.append(it)
    if missing:
        raise CaptionFileError(f"{len(missing)} image(s) have no caption: {', '.join(missing[:10])}"
                               + (" ..." if len(missing) > 10 else ""))
    return items


def load_image_sets(folder: Path, metadata_path: Path | None, trigger: str | None, eval_path: Path | None,
                    val_ratio: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training images, held-out images): `eval_path` is a folder (captions as for training) or its
    metadata.csv; without it, `val_ratio` of the training folder is held out (picked by `seed`)."""
    items = load_captioned_images(folder, metadata_path, trigger)
    if eval_path is not None:
        return items, load_eval_images(Path(eval_path), trigger)
    return split_eval(items, val_ratio, seed)


def load_eval_images(eval_path: Path, trigger: str | None = None) -> list[ImageItem]:
    """`eval_data_path` for images: a captioned folder, or the metadata.csv of one."""
    folder, meta = (eval_path.parent, eval_path) if eval_path.is_file() else (eval_path, None)
    return load_captioned_images(folder, meta, trigger)


# ---- repeats: how often each image is seen per epoch (read by the preflight too) ------------------------

FLAT_FOLDER_VIEWS = 100  # image views per epoch that auto-repeats aim for with a flat folder


def auto_repeats(items: list[ImageItem]) -> int:
    """Repeats for a flat folder so that one epoch holds about FLAT_FOLDER_VIEWS image views."""
    return max(1, math.ceil(FLAT_FOLDER_VIEWS / max(len(items), 1)))


def plan_repeats(items: list[ImageItem], repeats: int | None) -> list[int]:
    """Views per epoch of each image: `repeats` if set, else kohya's N_name folders, else auto for a flat folder."""
    if repeats:
        return [repeats] * len(items)
    if any(it.repeats > 1 for it in items):
        return [it.repeats for it in items]
    return [auto_repeats(items)] * len(items)


def describe_repeats(items: list[ImageItem], repeats: list[int]) -> str:
    if len(set(repeats)) == 1:
        return f"{len(items)} images x {repeats[0]} repeats = {sum(repeats)} views per epoch"
    return f"{len(items)} images, repeats from the N_name folders: {sum(repeats)} views per epoch"
