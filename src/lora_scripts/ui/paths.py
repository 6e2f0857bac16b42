"""Paths a request names, read against the folder the UI serves: refused when they lead out of it, and a
config's relative paths read from it (its jobs run there; the server's own working folder can be anywhere)."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException


def inside(root: Path, relative: str) -> Path:
    """`relative` under `root`; HTTP 403 when it resolves anywhere else."""
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise HTTPException(403, f"{relative}: outside the folder this UI serves ({base})")
    return path


ROOTED_PATHS = ("train_data_dir", "metadata_path", "eval_data_path", "model_config_dir", "output_dir", "logging_dir")


def rooted(cfg, root: Path):
    """The config with its relative paths read from the root, as a job (run there) reads them: the server's
    own working folder can be anywhere."""
    changes = {name: root / getattr(cfg, name) for name in ROOTED_PATHS
               if getattr(cfg, name) is not None and not Path(getattr(cfg, name)).is_absolute()}
    if not Path(cfg.base_model).is_absolute() and (root / cfg.base_model).exists():  # else an embedded name
        changes["base_model"] = str(root / cfg.base_model)
    return cfg.model_copy(update=changes)
