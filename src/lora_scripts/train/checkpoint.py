"""Atomic checkpoints and resume: trainable weights, optimizer, schedule, RNG states, fp16 loss scale, position.

A checkpoint is written to a hidden temporary folder, checksummed, fsynced and renamed into place, so a kill
never leaves a partial checkpoint that looks valid; `resume_from: latest` takes the newest verified one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_scripts.config import TrainConfig
from lora_scripts.config_rules import training_settings
from lora_scripts.hashing import sha256_file
from lora_scripts.train.errors import DiskFullError, ResumeError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE = "COMPLETE.json"


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done; in `epoch`, `group` accumulation groups done."""

    step: int = 0
    epoch: int = 0
    group: int = 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable. Only where folders can be opened (POSIX): Windows has no
    O_DIRECTORY and refuses to open a folder, and NTFS journals the rename itself."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_rng_states() -> dict[str, torch.Tensor]:
    """This process's torch generators: the CPU one and, on a GPU, the current device's."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_rng_state(folder: Path, ranks: list[dict[str, torch.Tensor]] | None = None) -> None:
    """RNG states as JSON + safetensors (no pickle, so a checkpoint from elsewhere cannot run code).

    `ranks` holds every process's torch generators (each rank draws its own dropout masks); without it,
    this process's alone.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    info = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    (folder / "rng.json").write_text(json.dumps(info))
    tensors = {}
    for rank, states in enumerate(ranks or [torch_rng_states()]):
        tensors.update({f"{name}.rank{rank}": state.cpu() for name, state in states.items()})
    save_file(tensors, str(folder / "rng.safetensors"))


def load_rng_state(folder: Path, rank: int = 0) -> None:
    """Restore the generators; each process takes its own torch states (rank 0's when it has none)."""
    info = json.loads((folder / "rng.json").read_text())
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(folder / "rng.safetensors"))
    if "torch" in tensors:  # a checkpoint written before per-rank states: {"torch", "cuda0", ...}
        tensors = {"torch.rank0": tensors["torch"], **({"cuda.rank0": tensors["cuda0"]} if "cuda0" in tensors else {})}
    mine = rank if f"torch.rank{rank}" in tensors else 0
    torch.set_rng_state(tensors[f"torch.rank{mine}"])
    if f"cuda.rank{mine}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"cuda.rank{mine}"])


def save_checkpoint(
    output_dir: Path,
    pos: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: TrainConfig,
    export_fn=None,
    keep: int | None = None,
    scaler=None,
    rng_ranks: list[dict[str, torch.Tensor]] | None = None,
    record: dict | None = None,
    hook_states: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically.

    Everything goes into a hidden temporary folder first; a COMPLETE.json with each file's size and
    sha256 is written last, the files and folder are fsynced, and one rename makes the checkpoint
    visible. A kill at any moment leaves either the previous state or a complete new checkpoint.
    `record`: what the run keeps beside its position in state.json (the data fingerprint, the best eval);
    `hook_states`: {file stem: tensors} of the run's step hooks (AdaLoRA's scores), one file each.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{pos.step:06d}"
    tmp = output_dir / f".tmp-checkpoint-{pos.step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    previous = list_checkpoints(output_dir)
    try:
        _write_checkpoint(tmp, pos, model, optimizer, scheduler, cfg, export_fn, scaler, rng_ranks, record,
                          hook_states or {})
    except (OSError, RuntimeError, SafetensorError) as exc:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        need = max(written, sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) if previous else 0)
        reason = _out_of_space(exc, output_dir, need)
        if reason is None:
            raise
        free = shutil.disk_usage(output_dir).free
        raise DiskFullError(
            f"{reason} while writing checkpoint {final}. A checkpoint needs about {max(need, 1) / 1e6:.1f} MB free in "
            f"{output_dir} (free now: {free / 1e6:.1f} MB). "
            + (f"The previous checkpoint {previous[-1]} is intact; free some space and resume with "
               "resume_from: latest." if previous else "No earlier checkpoint exists.")
        ) from None

    if final.exists():  # a rerun over the same step: replace it, never merge into it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _out_of_space(exc: BaseException, output_dir: Path, need: int) -> str | None:
    """Why a checkpoint write failed, when it is space: each writer says it its own way. Python's file
    writes raise OSError(ENOSPC); safetensors raises SafetensorError("... No space left on device (os error
    28)"); torch.save raises a RuntimeError that names no cause ("unexpected pos 576 vs 534"), so there the
    free space decides. None: some other fault, raised as it is."""
    errno_ = getattr(exc, "errno", None)
    text = str(exc)
    if errno_ == errno.EDQUOT or "Disk quota" in text or "os error 122" in text:
        return "disk quota exceeded"
    if errno_ == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "disk full"
    if errno_ == errno.EFBIG or "File too large" in text or "os error 27" in text:
        return "file size limit reached (ulimit -f)"
    if isinstance(exc, RuntimeError) and shutil.disk_usage(output_dir).free < max(need, 1 << 20):
        return "disk full"
    return None


def _write_checkpoint(tmp: Path, pos: Position, model, optimizer, scheduler, cfg: TrainConfig, export_fn, scaler,
                      rng_ranks, record, hook_states) -> None:
    tmp.mkdir(parents=True)

    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    for stem, tensors in hook_states.items():
        save_file(tensors, str(tmp / f"{stem}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    save_rng_state(tmp, rng_ranks)
    state = {**asdict(pos), "time": time.time(), "settings": training_settings(cfg), **(record or {})}
    if scaler is not None:  # fp16: the loss scale it had found, so a resumed run does not start over at 65536
        state["grad_scaler"] = scaler.state_dict()
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if export_fn is not None:
        export_fn(tmp)  # the family's own format (a PEFT adapter, a kohya file) so a checkpoint is usable as is

    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    complete = tmp / COMPLETE
    complete.write_text(json.dumps({"step": pos.step, "files": files}, indent=2))
    with open(complete, "rb+") as fh:
        os.fsync(fh.fileno())
    _fsync_dir(tmp)


def replace_folder(final: Path, write) -> Path:
    """`write(folder)` into a hidden folder, then swap it in for `final`: a reader sees the old folder or
    the new one, never half of one (the save_best adapter folder)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete `.tmp-checkpoint-*` folders left by a killed run (call only while holding the run lock)."""
    removed = sorted(Path(output_dir).glob(".tmp-checkpoint-*")) if Path(output_dir).exists() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and every file matches its recorded checksum; else why not."""
    complete = path / COMPLETE
    if not complete.exists():
        return "no COMPLETE.json (an interrupted write)"
    try:
        info = json.loads(complete.read_text())
    except ValueError:
        return "COMPLETE.json is not valid JSON"
    for name, meta in info.get("files", {}).items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(spec: str, output_dir: Path) -> Path | None:
    """`latest` → the newest verified checkpoint in output_dir (None when there is none); else a path."""
    if spec == "latest":
        for ckpt in reversed(list_checkpoints(output_dir)):
            if verify_checkpoint(ckpt) is None:
                return ckpt
        return None
    path = Path(spec)
    if not path.is_dir():
        raise ResumeError(f"resume_from: {path} is not a checkpoint folder")
    problem = verify_checkpoint(path)
    if problem:
        raise ResumeError(f"resume_from: {path} cannot be used: {problem}")
    return path


def data_fingerprint(rows: list) -> dict:
    """What the training data was: how many samples and a sha256 of their content (JSON-able rows, e.g.
    each sample's text, or each image's path, content hash, caption and repeats)."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return {"samples": len(rows), "sha256": digest}


def resume_differences(state: dict, cfg: TrainConfig, data: dict | None) -> list[str]:
    """How this run differs from the one whose checkpoint `state` (its state.json) is: settings that shape
    the weights, and the data; empty for a checkpoint written before these were recorded."""
    then, now = state.get("settings"), training_settings(cfg)
    changes = []
    if then is not None:
        for key in sorted(set(then) | set(now)):
            if then.get(key) != now.get(key):
                changes.append(f"{key}: {then.get(key)!r} at the checkpoint, {now.get(key)!r} now")
    old = state.get("data")
    if old is not None and data is not None and old != data:
        same_count = old["samples"] == data["samples"]
        changes.append(f"the training data: {old['samples']} samples at the checkpoint, {data['samples']} now"
                       + (" (same count, different content)" if same_count else ""))
    return changes


def resume_position(cfg: TrainConfig, model: torch.nn.Module, optimizer, scheduler, events, scaler=None,
                    rank: int = 0, data: dict | None = None, hooks=()) -> tuple[Position, dict]:
    """(Position(), {}) for a fresh run, or the restored position of `resume_from` (weights, optimizer,
    schedule, loss scale and RNG loaded) and its state.json. `latest` with no checkpoint yet starts fresh,
    with a warning. A checkpoint written with other settings or data is refused, naming each difference
    (`resume_force` warns instead)."""
    if not cfg.resume_from:
        return Position(), {}
    out_dir = Path(cfg.output_dir)
    ckpt = find_resume_checkpoint(cfg.resume_from, out_dir)
    if ckpt is None:
        events.emit("warning", message=f"resume_from: latest found no checkpoint in {out_dir}; starting fresh")
        return Position(), {}
    state = json.loads((ckpt / "state.json").read_text())
    changes = resume_differences(state, cfg, data)
    if changes and not cfg.resume_force:
        raise ResumeError(f"resume_from: {ckpt} was written by a run with other settings or data:\n  "
                          + "\n  ".join(changes) + "\nUndo the change, train into a new output_dir, or set "
                          "resume_force: true to continue anyway")
    for change in changes:
        events.emit("warning", message=f"resume_force: continuing although {change}")
    pos = load_checkpoint(ckpt, model, optimizer, scheduler, scaler, rank, hooks)
    events.emit("info", message=f"resumed from {ckpt} at step {pos.step} (epoch {pos.epoch + 1})")
    return pos, state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler=None, rank: int = 0,
                    hooks=()) -> Position:
    """Restore a checkpoint into the run's model, optimizer, schedule, loss scale, RNG and step hooks."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unexpected = [n for n in weights if n not in params]
    if missing or unexpected:
        raise ResumeError(
            f"{path}: the checkpoint does not fit this model/config "
            f"({len(missing)} adapter tensors missing, {len(unexpected)} unexpected; e.g. "
            f"{(missing or unexpected)[0]}). Was lora_rank, target_modules or base_model changed?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ResumeError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model wants "
                                  f"{tuple(params[name].shape)}; was lora_rank changed?")
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    for hook in hooks:
        if not (path / f"{hook.state_file}.safetensors").exists():
            raise ResumeError(f"{path}: has no {hook.state_file}.safetensors, which this run's adapter needs; "
                              "was lora_type changed?")
        hook.load_state_dict(load_file(str(path / f"{hook.state_file}.safetensors")))
    load_rng_state(path, rank)
    state = json.loads((path / "state.json").read_text())
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    return Position(step=state["step"], epoch=state["epoch"], group=state["group"])

