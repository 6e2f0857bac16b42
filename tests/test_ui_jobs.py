"""Jobs of the web UI: real `lora-scripts train` processes on a tiny Llama, followed through their records on
disk: a queue of one at a time, a store opened afresh (the server restarted) finding a running job, stop
(SIGINT to the job's process group) moving the queue on, resume queued, and what is refused. A stop's
checkpoint and resume line, and a resume to the end, are followed in the browser (test_ui_e2e)."""

import json
import os
import signal
import time

import psutil
import pytest

from lora_scripts.config import ConfigError
from lora_scripts.ui.jobs import Job, JobError, JobStore


def write_config(path, tiny_llama, pairs_csv, out, **keys):
    base = {"base_model": str(tiny_llama), "metadata_path": str(pairs_csv), "output_dir": str(out), "batch_size": 4,
            "learning_rate": 5e-3, "seed": 7, "mixed_precision": "no", "drift_check": False, "save_steps": 1000,
            **keys}
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in base.items()))
    return path


def wait_for(store: JobStore, job_id: str, states: tuple[str, ...], timeout: float = 180) -> Job:
    end = time.time() + timeout
    while time.time() < end:
        store.refresh()
        job = store.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {store.get(job_id).state} after {timeout} s:\n"
                         + store.log_path(job_id).read_text()[-2000:])


def test_a_queue_that_survives_a_restart_and_moves_on_when_a_job_is_stopped(tiny_llama, pairs_csv, tmp_path):
    """One job at a time; the UI server restarts (a new store on the same folder, without the old one's
    process handles) and still finds the running job; stopping it (SIGINT to its process group) starts the
    next one, which fails as its config asks; the stopped job is queued again to resume from its latest
    checkpoint, behind it. What a stop leaves (the step finished, a checkpoint, exit 130, the resume line)
    and a resume to the end are checked through the browser in test_ui_e2e, on a run long enough to have them."""
    store = JobStore(tmp_path / "jobs")
    job = store.submit(write_config(tmp_path / "long.yaml", tiny_llama, pairs_csv, tmp_path / "long", epochs=50))
    # queued behind it: a job whose preflight fails (a real process, quick), so `failed` is seen for real too
    short = store.submit(write_config(tmp_path / "short.yaml", tmp_path / "no-such-model", pairs_csv,
                                      tmp_path / "short"))
    assert (job.state, short.state) == ("running", "queued")

    restarted = JobStore(tmp_path / "jobs")
    assert [j.state for j in restarted.refresh()] == ["running", "queued"]  # found alive by pid + start time
    assert restarted.stop(job.id).state == "stopping"
    job = wait_for(restarted, job.id, ("interrupted", "failed", "finished"))
    assert job.state == "interrupted", restarted.log_path(job.id).read_text()[-2000:]
    with pytest.raises(JobError, match="only a queued or running job can be stopped"):
        restarted.stop(job.id)

    again = restarted.resume(job.id)  # queued behind the short job, which started when the long one ended
    assert again.state == "queued" and again.resume_of == job.id and again.overrides[-1] == "resume_from=latest"
    assert again.command[-1] == "resume_from=latest"
    short = wait_for(restarted, short.id, ("finished", "failed"))
    assert short.state == "failed" and short.exit_code == 2 and short.started >= job.ended - 1.5
    assert "no-such-model: no such file or folder" in restarted.log_path(short.id).read_text()
    with pytest.raises(JobError, match="only an interrupted or failed job can be resumed"):
        restarted.resume(wait_for(restarted, again.id, ("running",)).id)
    assert restarted.stop(again.id).state == "stopping"
    assert wait_for(restarted, again.id, ("interrupted", "failed", "finished")).state == "interrupted"


def test_a_reused_pid_is_not_taken_for_the_job_and_bad_requests_are_refused(tiny_llama, pairs_csv, tmp_path):
    store = JobStore(tmp_path / "jobs")
    # a record of a job whose runner is gone, its pid since given to a live process (this one)
    ghost = Job("20260101-000000-abcdef", str(tmp_path / "x.yaml"), str(tmp_path / "x"), state="running",
                created=1.0, started=1.0, pid=os.getpid(), pid_started=12345.0)
    (tmp_path / "jobs" / f"{ghost.id}.json").write_text(json.dumps(ghost.__dict__))
    store.refresh()
    assert store.get(ghost.id).state == "failed"  # no exit code, no stop asked: it did not end well

    for bad in ["../jobs", "..", "a/b", ".hidden", "nope"]:
        with pytest.raises(JobError, match="no job"):
            store.get(bad)
    (tmp_path / "broken.yaml").write_text("lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="did you mean lora_rank"):
        store.submit(tmp_path / "broken.yaml")
    assert [j.id for j in store.jobs()] == [ghost.id]  # nothing queued for it


def test_a_job_that_does_not_stop_in_time_is_killed(tiny_llama, pairs_csv, tmp_path):
    """A hung job (frozen here with SIGSTOP, so SIGINT cannot end it): stop asks with SIGINT and, past the
    grace period (here none), the next refresh kills the job's whole process group; it is recorded as
    interrupted, with no exit code (its runner was killed too, so nothing wrote one)."""
    store = JobStore(tmp_path / "jobs", stop_grace=0.0)
    job = store.submit(write_config(tmp_path / "long.yaml", tiny_llama, pairs_csv, tmp_path / "long", epochs=50))
    group = [p.pid for p in psutil.Process(job.pid).children(recursive=True)] + [job.pid]
    os.killpg(job.pid, signal.SIGSTOP)
    store.stop(job.id)
    job = wait_for(store, job.id, ("interrupted", "failed", "finished"), timeout=30)
    assert job.state == "interrupted" and job.exit_code is None
    end = time.time() + 10
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(map(alive, group)):
        assert time.time() < end, "the job's processes outlived the kill"
        time.sleep(0.1)
