"""`label_folder`: label every unlabelled image of a folder, keeping people's captions and an interrupted run's work."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_scripts.atomic import write_text_atomic
from lora_scripts.data.images import CaptionFileError, open_rgb, read_caption_csv, read_sidecar, scan_images
from lora_scripts.label.captioner import Captioner
from lora_scripts.label.clip import DEFAULT_CLIP, ClipInterrogator, read_phrase_file
from lora_scripts.label.writer import compose_prompt, write_csv_atomic

PROGRESS_SUFFIX = ".labeling.json"


class LabelError(RuntimeError):
    pass


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


def _has_sidecar_caption(path: Path) -> bool:
    try:
        return bool(read_sidecar(path))
    except CaptionFileError:  # not UTF-8: still a person's caption; the preflight reports the encoding
        return True


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LabelResult:
    labelled: dict[str, str] = field(default_factory=dict)  # filename -> prompt written this run
    kept: int = 0  # images whose existing caption (a CSV row or a sidecar .txt) was left as it was
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

    # Hand captions of every kind are kept: CSV rows (by relative path, or by bare name as kohya-style
    # folders are often listed) and sidecar .txt files, which --overwrite replaces only with --sidecar.
    def captioned(it) -> bool:
        if it.key in rows or it.path.name in rows:
            return True
        return not (overwrite and sidecar) and _has_sidecar_caption(it.path)

    todo = [it for it in items if not captioned(it)]
    result = LabelResult(kept=len(items) - len(todo) - (len(done_this_pass & {it.key for it in items})))
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
