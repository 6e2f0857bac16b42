"""What stops a run, and why: the exceptions the loops raise and the CLI turns into messages and exit codes."""

from __future__ import annotations

from pathlib import Path


class ResumeError(RuntimeError):
    pass


class UnsupportedLaunchError(RuntimeError):
    """The processes were launched in a way training does not support (e.g. FSDP); said before any work."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says why and what was kept."""


class DiskFullError(TrainingStopped):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the current step was finished and a checkpoint saved."""

    def __init__(self, signal_name: str, checkpoint: Path | None):
        super().__init__(f"{signal_name}: stopped after saving {checkpoint}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint

