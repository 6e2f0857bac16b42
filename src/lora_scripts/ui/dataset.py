"""An image folder's captions, as the UI's dataset page reads and edits them.

The trainer reads a caption from metadata.csv first, then from a sidecar .txt beside the image
(data/images.load_captioned_images). Edits are written to metadata.csv, every image's current caption with
them, so what the page shows is what training reads; the previous metadata.csv is kept as
metadata.csv.bak and the write is atomic (label/writer.write_csv_atomic). Sidecar files are never changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_scripts.data.images import CaptionTable, read_caption_csv, read_sidecar, scan_images


class CaptionEditError(ValueError):
    pass


def image_captions(folder: Path) -> tuple[list[dict], list[str]]:
    """([{key, caption, source}] for every image, in the trainer's order; the caption file's problems).
    source: metadata.csv, the sidecar .txt, or None for an image without a caption."""
    folder = Path(folder)
    meta = folder / "metadata.csv"
    table = read_caption_csv(meta) if meta.exists() else CaptionTable()
    rows = []
    for item in scan_images(folder):
        caption = table.captions.get(item.key, table.captions.get(item.path.name))
        source = "metadata.csv" if caption is not None else None
        if caption is None and (caption := read_sidecar(item.path)) is not None:
            source = item.path.with_suffix(".txt").name
        rows.append({"key": item.key, "caption": caption, "source": source})
    return rows, table.problems


def save_captions(folder: Path, changes: dict[str, str]) -> int:
    """Write `changes` (image key -> caption) with every other image's current caption into metadata.csv;
    the number of captions changed. An unknown key or an empty caption is refused before anything is written."""
    return _save(Path(folder), _current(folder), changes)


def _current(folder: Path) -> dict[str, str | None]:
    """image key -> its caption now (None: none yet)."""
    return {r["key"]: r["caption"] for r in image_captions(folder)[0]}


def _save(folder: Path, current: dict[str, str | None], changes: dict[str, str]) -> int:
    """save_captions with the folder's current captions already read (the edits below read them first)."""
    from lora_scripts.label.writer import write_csv_atomic  # not at import: the label package brings torch

    unknown = sorted(set(changes) - set(current))
    if unknown:
        raise CaptionEditError(f"no such image in {folder.name}: {', '.join(unknown[:5])}")
    empty = sorted(k for k, c in changes.items() if not c.strip())
    if empty:
        raise CaptionEditError(f"empty caption for {', '.join(empty[:5])}: an image without a caption stops training")
    changed = sum(current[k] != c.strip() for k, c in changes.items())
    merged = {k: changes[k].strip() if k in changes else c for k, c in current.items() if k in changes or c}
    meta = folder / "metadata.csv"
    if meta.exists():
        shutil.copy2(meta, folder / "metadata.csv.bak")
    write_csv_atomic(meta, merged)
    return changed


def replace_in_captions(folder: Path, find: str, replace: str) -> int:
    """Every caption with `find` replaced by `replace`; the number of captions changed."""
    if not find:
        raise CaptionEditError("nothing to find")
    current = _current(folder)
    changes = {k: c.replace(find, replace) for k, c in current.items() if c and find in c}
    return _save(Path(folder), current, changes) if changes else 0


def prepend_trigger(folder: Path, word: str) -> int:
    """`word, ` in front of every caption that does not start with it; the number of captions changed."""
    word = word.strip().strip(",").strip()
    if not word:
        raise CaptionEditError("the trigger word is empty")
    current = _current(folder)
    changes = {k: f"{word}, {c}" for k, c in current.items() if c and c.split(",")[0].strip() != word}
    return _save(Path(folder), current, changes) if changes else 0
