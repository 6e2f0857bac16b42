"""The LoRA tools' arithmetic: convert, combine, resize, extract, merge. Every verb is a Python function
first; the CLI only parses arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lora_scripts.export.diffusers_lora import diffusers_components, to_kohya_names, write_diffusers_file
from lora_scripts.export.lora_files import (
    LoraFormatError,
    LoraModule,
    LoraSet,
    read_lora,
    write_kohya_file,
    write_peft_folder,
)

# ---- convert ---------------------------------------------------------------------------------------


def convert(src: str | Path, out: str | Path, to: str, config_dir: Path | None = None) -> Path:
    lora = read_lora(src)
    if to == "kohya":
        return write_kohya_file(to_kohya_names(lora, config_dir), Path(out))
    if to == "diffusers":
        kohya = to_kohya_names(lora, config_dir)
        return write_diffusers_file(diffusers_components(kohya, config_dir), Path(out), kohya.family)
    if to == "peft":
        if lora.format != "peft":
            raise LoraFormatError(
                "Stable Diffusion LoRAs have no PEFT adapter folder form that SD tools read; use --to kohya "
                "(WebUIs, ComfyUI) or --to diffusers")
        return write_peft_folder(lora, Path(out), lora.peft_config)
    raise LoraFormatError(f"unknown target format {to!r}; use kohya, diffusers or peft")


# ---- combine and resize --------------------------------------------------------------------------------


@dataclass
class ModuleReport:
    name: str
    rank_in: int
    rank_out: int
    retained: float  # retained Frobenius norm of ΔW, 0..1


def _svd_factor(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[LoraModule, float, int]:
    """ΔW ≈ up @ down at the given rank (or the least rank keeping `energy` of the squared norm)."""
    shape = delta.shape
    mat = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    total = float((s**2).sum())
    if rank is None:
        cum = torch.cumsum(s**2, 0) / max(total, 1e-30)
        rank = int((cum < (energy or 1.0) - 1e-12).sum()) + 1
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float()
    down = (root[:, None] * vh[:rank]).float()
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    retained = (float((s[:rank] ** 2).sum()) / total) ** 0.5 if total > 0 else 1.0
    return LoraModule(down, up, float(rank)), retained, rank


def resize(lora: LoraSet, rank: int | None = None, energy: float | None = None) -> tuple[LoraSet, list[ModuleReport]]:
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    modules, report = {}, []
    for name, m in lora.modules.items():
        if m.dora_scale is not None:
            raise LoraFormatError(f"{name}: DoRA modules cannot be resized by SVD (the magnitude depends on W)")
        new, kept, r = _svd_factor(m.delta(), rank, energy)
        modules[name] = new
        report.append(ModuleReport(name, m.rank, r, kept))
    meta = {**lora.metadata, "ss_network_dim": str(rank or "dynamic"), "ss_network_alpha": str(rank or "dynamic")}
    return LoraSet(modules, lora.format, meta, lora.peft_config), report


def combine(loras: list[tuple[LoraSet, float]], rank: int | None = None) -> tuple[LoraSet, list[ModuleReport]]:
    """Σ wᵢ ΔWᵢ: exactly by concatenating ranks (rank None), or by SVD of the sum at `rank`."""
    formats = {lr.format for lr, _ in loras}
    if len(formats) != 1:
        raise LoraFormatError(f"cannot combine different formats {sorted(formats)}; convert them first")
    names = sorted({n for lr, _ in loras for n in lr.modules})
    modules, report = {}, []
    for name in names:
        parts = [(lr.modules[name], w) for lr, w in loras if name in lr.modules]
        if rank is None:
            ups = [m.up.float() * (w * m.scale) for m, w in parts]
            downs = [m.down.float() for m, _ in parts]
            r = sum(d.shape[0] for d in downs)
            modules[name] = LoraModule(torch.cat(downs, 0), torch.cat(ups, 1), float(r))
            report.append(ModuleReport(name, r, r, 1.0))
        else:
            delta = sum(m.delta() * w for m, w in parts)
            modules[name], kept, r = _svd_factor(delta, rank, None)
            report.append(ModuleReport(name, sum(m.rank for m, _ in parts), r, kept))
    first = loras[0][0]
    return LoraSet(modules, first.format, dict(first.metadata), first.peft_config), report


def save_like(lora: LoraSet, out: Path) -> Path:
    return write_peft_folder(lora, out, lora.peft_config) if lora.format == "peft" else write_kohya_file(
        lora if lora.format == "kohya" else to_kohya_names(lora), out)


# ---- extract ---------------------------------------------------------------------------------------------


def extract_deltas(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int,
                   min_change: float = 1e-8) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """SVD of tuned - base for each 2-D/4-D weight that changed."""
    modules, report = {}, []
    for name, w_base in base.items():
        w_tuned = tuned.get(name)
        if w_tuned is None or w_tuned.shape != w_base.shape or w_base.dim() not in (2, 4):
            continue
        delta = w_tuned.float() - w_base.float()
        if float(delta.abs().max()) <= min_change:
            continue
        modules[name], kept, r = _svd_factor(delta, rank, None)
        report.append(ModuleReport(name, min(delta.flatten(1).shape), r, kept))
    return modules, report
