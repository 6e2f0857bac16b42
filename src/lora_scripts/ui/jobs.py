"""Training jobs that outlive the browser tab and the UI server.

A job is one `lora-scripts` command run in a process group of its own (a new session): mostly
`train --config FILE [key=value ...]`, also the other device work the UI starts (`label`, `generate`,
`export`, the LoRA tools), so closing the page, losing the connection or restarting the UI server leaves
it running. All a job is lives on disk under the store's folder: `<id>.json` (the record, written by the store alone,
atomically), `<id>.log` (the trainer's output) and `<id>.exit` (its exit code, written by the small runner
that waits for it). The store keeps no state of its own: any store opened on the folder (the server after a
restart) reads the records back and re-attaches, finding a live job by its pid and the process's start
time, so a reused pid is never taken for it.

States: queued -> running -> finished | failed | interrupted; `stop` makes a running job `stopping` (SIGINT:
the trainer finishes its step, saves a checkpoint and exits 130) and, past the grace period, kills it.
`resume` queues a training job's config again with `resume_from=latest`. One job runs at a time (one
device); others wait in order.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from lora_scripts.atomic import write_text_atomic

ACTIVE = ("running", "stopping")
FINAL = ("finished", "failed", "interrupted")
EXIT_INTERRUPTED = 130  # the trainer's exit code after Ctrl-C / SIGINT: a checkpoint was saved


class JobError(ValueError):
    """A job action that does not apply (an unknown id, stopping a finished job, resuming a running one)."""


@dataclass
class Job:
    id: str
    config: str  # the training config file ("" for other commands)
    output_dir: str  # the run's folder (events.jsonl, checkpoints, the adapter), or where a command writes
    overrides: list[str] = field(default_factory=list)  # key=value, as on the command line
    kind: str = "train"  # the lora-scripts verb: train, label, generate, export, convert, inspect, ...
    command: list[str] = field(default_factory=list)  # the arguments after `lora-scripts` (never a shell string)
    state: str = "queued"
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    pid: int | None = None  # the runner's: leader of the job's process group
    pid_started: float | None = None  # its start time: tells it from a later process given the same pid
    stop_requested: float | None = None
    exit_code: int | None = None
    resume_of: str | None = None  # the job this one continues
    cwd: str = "."  # where it runs: relative paths in its config are read from here


def train_command(config: str, overrides: list[str]) -> list[str]:
    return ["train", "--config", config, "--no-progress", *overrides]


def _new_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class JobStore:
    def __init__(self, folder: Path, stop_grace: float = 120.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stop_grace = stop_grace
        self._children: dict[int, subprocess.Popen] = {}  # runners this store started: polled, so none is left a zombie

    @contextmanager
    def _locked(self):
        """One changer of the records at a time, across threads (the server's refresh tick and its requests)
        and processes (two servers on one folder): otherwise both could start the same queued job."""
        with open(self.folder / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- records ------------------------------------------------------------------------------------------

    def _path(self, job_id: str, suffix: str) -> Path:
        return self.folder / f"{job_id}{suffix}"

    def _save(self, job: Job) -> Job:
        write_text_atomic(self._path(job.id, ".json"), json.dumps(asdict(job), indent=2))
        return job

    def get(self, job_id: str) -> Job:
        path = self._path(job_id, ".json")
        if "/" in job_id or "\\" in job_id or job_id.startswith(".") or not path.exists():
            raise JobError(f"no job {job_id!r}")
        return Job(**json.loads(path.read_text(encoding="utf-8")))

    def jobs(self) -> list[Job]:
        """Every job, oldest first."""
        found = [Job(**json.loads(p.read_text(encoding="utf-8"))) for p in self.folder.glob("*.json")]
        return sorted(found, key=lambda j: (j.created, j.id))

    def log_path(self, job_id: str) -> Path:
        return self._path(self.get(job_id).id, ".log")

    # ---- actions ------------------------------------------------------------------------------------------

    def submit(self, config: Path, overrides: list[str] | None = None, resume_of: str | None = None,
               cwd: Path | None = None) -> Job:
        """Queue `lora-scripts train --config config [overrides]`, run in `cwd` (default: here); it starts at
        once when no job runs, else when the ones before it have ended. The config is read now, so a broken
        one is refused here, with the config's own message."""
        from lora_scripts.config_file import load_config

        overrides = list(overrides or [])
        cwd = Path(cwd or Path.cwd()).resolve()
        cfg = load_config(config, overrides)
        config = str((cwd / config).resolve())
        return self._queue(Job(_new_id(), config, str((cwd / cfg.output_dir).resolve()), overrides, kind="train",
                               command=train_command(config, overrides), resume_of=resume_of, cwd=str(cwd)))

    def submit_command(self, command: list[str], output_dir: Path, cwd: Path) -> Job:
        """Queue another `lora-scripts` command (`["label", "--input", ...]`); `output_dir`: what it writes."""
        return self._queue(Job(_new_id(), "", str(Path(output_dir).resolve()), kind=command[0],
                               command=list(command), cwd=str(Path(cwd).resolve())))

    def _queue(self, job: Job) -> Job:
        job.created = time.time()
        with self._locked():
            self._save(job)
        self.refresh()
        return self.get(job.id)

    def stop(self, job_id: str) -> Job:
        """SIGINT to a running job's process group (the trainer saves a checkpoint and exits); a queued job is
        dropped. Past `stop_grace` seconds a refresh kills the group."""
        with self._locked():
            job = self.get(job_id)
            if job.state == "queued":
                job.state, job.ended = "interrupted", time.time()
                return self._save(job)
            if job.state not in ACTIVE:
                raise JobError(f"job {job_id} is {job.state}; only a queued or running job can be stopped")
            if job.state == "running":
                job.state, job.stop_requested = "stopping", time.time()
                self._save(job)
                self._signal(job, signal.SIGINT)
            return job

    def resume(self, job_id: str) -> Job:
        """Queue the job's config again, continuing from its latest checkpoint."""
        job = self.get(job_id)
        if job.kind != "train":
            raise JobError(f"job {job_id} is a {job.kind} command; only training resumes from a checkpoint")
        if job.state not in ("interrupted", "failed"):
            raise JobError(f"job {job_id} is {job.state}; only an interrupted or failed job can be resumed")
        overrides = [o for o in job.overrides if not o.startswith("resume_from=")] + ["resume_from=latest"]
        return self.submit(Path(job.config), overrides, resume_of=job.id, cwd=Path(job.cwd))

    # ---- the processes ------------------------------------------------------------------------------------

    def refresh(self) -> list[Job]:
        """Bring every record up to date with its process, then start the oldest queued job if none runs.
        Cheap; the server calls it every second or so, and any request may."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:  # reaped: no zombie left behind
                del self._children[pid]
        with self._locked():
            jobs = self.jobs()
            for job in jobs:
                if job.state in ACTIVE:
                    self._follow(job)
            if not any(j.state in ACTIVE for j in jobs):
                queued = [j for j in jobs if j.state == "queued"]
                if queued:
                    self._start(queued[0])
            return self.jobs()

    def _alive(self, job: Job) -> bool:
        if job.pid is None:
            return False
        try:
            proc = psutil.Process(job.pid)
            return (abs(proc.create_time() - (job.pid_started or 0)) < 0.01
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def _follow(self, job: Job) -> None:
        if self._alive(job):
            if job.state == "stopping" and time.time() - (job.stop_requested or 0) > self.stop_grace:
                self._signal(job, signal.SIGKILL)
            return
        exit_file = self._path(job.id, ".exit")
        job.exit_code = int(exit_file.read_text()) if exit_file.exists() else None
        if job.exit_code == 0:
            job.state = "finished"
        elif job.exit_code == EXIT_INTERRUPTED or job.stop_requested:
            job.state = "interrupted"  # stopped: with a checkpoint (130), or before it had trained anything
        else:
            job.state = "failed"  # an error (its message is in the log), or the runner itself was killed
        job.ended = time.time()
        self._save(job)

    def _start(self, job: Job) -> None:
        # a record from before jobs held their command was always a training run
        command = [sys.executable, "-m", "lora_scripts.cli", *(job.command or train_command(job.config, job.overrides))]
        runner = [sys.executable, "-m", "lora_scripts.ui.runner", str(self._path(job.id, ".exit")),
                  str(self._path(job.id, ".log")), "--", *command]
        child = subprocess.Popen(runner, cwd=job.cwd, start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._children[child.pid] = child
        job.state, job.started, job.pid = "running", time.time(), child.pid
        job.pid_started = psutil.Process(child.pid).create_time()
        self._save(job)

    def _signal(self, job: Job, sig: int) -> None:
        try:
            os.killpg(job.pid, sig)  # the runner leads the group; the trainer and its workers are in it
        except (ProcessLookupError, PermissionError):
            pass
