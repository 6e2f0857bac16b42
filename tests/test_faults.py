"""Faults injected for real: a busy output folder, a full disk, NaN, out of memory, forged files, bad paths."""

import errno
import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_scripts.config import ConfigError
from lora_scripts.config_file import load_config
from lora_scripts.data.images import CaptionFileError, read_caption_csv
from lora_scripts.safety import RunLock, RunLockedError, UnsafeFileError, check_safetensors
from lora_scripts.train import checkpoint
from lora_scripts.train import llm as llm_train
from lora_scripts.train.errors import TrainingStopped


def args(model, data, out, **kw):
    base = {"base_model": model, "metadata_path": data, "output_dir": out, "epochs": 2, "batch_size": 4,
            "learning_rate": 5e-3, "save_steps": 2, "max_new_tokens": 4,
            "mixed_precision": "no"}  # fp32 on every machine (auto would be bf16 where the CPU has bf16 units)
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_second_run_on_the_same_output_dir_is_refused(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "busy"
    holder = RunLock(out).acquire()  # a live run (this process) holds the folder
    with pytest.raises(RunLockedError, match=r"is in use by another training run \(pid \d+"):
        llm_train.train_llm(args(tiny_llama, pairs_csv, out), progress=False)
    assert not (out / "events.jsonl").exists()  # the refused run wrote nothing
    holder.release()


def test_lock_of_a_dead_run_is_taken_over(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / RunLock.NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname()}))
    result = llm_train.train_llm(args(tiny_llama, pairs_csv, out, epochs=1), progress=False)
    assert result.steps == 6 and not (out / RunLock.NAME).exists()  # released at the end


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    real = checkpoint.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:  # first checkpoint: trainable + rng files; the second one fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "full"
    with pytest.raises(checkpoint.DiskFullError) as err:
        llm_train.train_llm(args(tiny_llama, pairs_csv, out), progress=False)
    msg = str(err.value)
    assert f"disk full while writing checkpoint {out / 'checkpoint-000004'}" in msg
    assert "MB free" in msg and f"previous checkpoint {out / 'checkpoint-000002'} is intact" in msg
    assert checkpoint.verify_checkpoint(out / "checkpoint-000002") is None
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-000004").exists()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert max(e.get("step", 0) for e in events if e["event"] == "step") == 4  # it did not train on


def test_nan_steps_can_be_skipped_up_to_a_limit(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    real = llm_train.causal_lm_loss
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        loss, n = real(model, batch)
        if not model.training:  # evaluations (the drift check) are not training steps
            return loss, n
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (2, 5) else loss), n

    monkeypatch.setattr(llm_train, "causal_lm_loss", sometimes_nan)
    result = llm_train.train_llm(args(tiny_llama, pairs_csv, tmp_path / "skip", skip_nan_steps=2, epochs=1),
                                 progress=False)
    warnings = [e["message"] for e in result.events if e["event"] == "warning"]
    assert len(warnings) == 2 and "step 2: loss is nan; update skipped (1 of skip_nan_steps=2)" in warnings[0]
    weights = torch.cat([p.flatten() for p in result.model.parameters() if p.requires_grad])
    assert torch.isfinite(weights).all()  # the skipped updates never reached the weights
    calls["n"] = 0
    with pytest.raises(TrainingStopped, match="loss became nan at step 5"):
        llm_train.train_llm(args(tiny_llama, pairs_csv, tmp_path / "stop", skip_nan_steps=1, epochs=1), progress=False)


def test_out_of_memory_names_the_knobs_to_turn(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    def oom(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(llm_train, "causal_lm_loss", oom)
    with pytest.raises(TrainingStopped) as err:
        llm_train.train_llm(args(tiny_llama, pairs_csv, tmp_path / "oom", batch_size=8, max_seq_length=512),
                            progress=False)
    msg = str(err.value)
    assert "batch_size: 8 -> 4 with gradient_accumulation_steps: 1 -> 2" in msg
    assert "gradient_checkpointing: true" in msg and "max_seq_length: 512 -> 256" in msg
    assert "mixed_precision: bf16" in msg


def forged(path, header, data=b"\x00" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_lying_safetensors_headers_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 2)}, good)
    assert "a" in check_safetensors(good)
    cases = {
        "past_end": {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
        "wrong_size": {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
        "overlap": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        "bad_dtype": {"a": {"dtype": "EVIL", "shape": [1], "data_offsets": [0, 1]}},
    }
    for name, header in cases.items():
        with pytest.raises(UnsafeFileError, match="corrupt or forged|unknown dtype"):
            check_safetensors(forged(tmp_path / f"{name}.safetensors", header))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(UnsafeFileError, match="does not fit"):
        check_safetensors(huge)


def test_forged_base_model_is_a_clean_preflight_error(tmp_path, capsys):
    from lora_scripts.cli import main

    bad = forged(tmp_path / "model.safetensors",
                 {"model.diffusion_model.x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {bad}\ntrain_data_dir: {tmp_path}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["validate", "--config", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "claims bytes 0..4000 but the data is 16 bytes; corrupt or forged" in out


def test_csv_paths_cannot_leave_the_dataset(tmp_path):
    for name in ["../../etc/passwd", "/etc/passwd", "sub/../../x.png", "C:/windows/x.png"]:
        p = tmp_path / "metadata.csv"
        p.write_text(f"filename,prompt\nok.png,fine\n{name},evil\n")
        with pytest.raises(CaptionFileError, match=r"metadata.csv:3: filename .* points outside the dataset folder"):
            read_caption_csv(p)


def test_output_name_must_be_a_plain_name():
    with pytest.raises(ConfigError, match="output_name: .*plain file name"):
        load_config(None, ["base_model=x", "output_name=../../evil"])


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_sigkill_during_a_checkpoint_write_leaves_no_valid_looking_checkpoint(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "killed"
    script = f"""
import os, signal
from lora_scripts.config_file import load_config
from lora_scripts.train import checkpoint, llm
real = checkpoint.torch.save
def save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    if "checkpoint-000004" in str(path) and str(path).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-write: optimizer saved, scheduler/rng/COMPLETE not yet
checkpoint.torch.save = save
llm.train_llm(load_config(None, {[f"base_model={tiny_llama}", f"metadata_path={pairs_csv}", f"output_dir={out}",
                                  "epochs=2", "batch_size=4", "save_steps=2", "learning_rate=5e-3"]!r}),
              progress=False)  # the settings args() gives the resumed run below: a resume must match them
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9
    assert list(out.glob(".tmp-checkpoint-000004-*"))  # the half-written folder is there, hidden...
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000002"]  # ...and never listed
    assert checkpoint.find_resume_checkpoint("latest", out) == out / "checkpoint-000002"
    with pytest.raises(checkpoint.ResumeError, match="no COMPLETE.json"):
        checkpoint.find_resume_checkpoint(str(next(out.glob(".tmp-checkpoint-000004-*"))), out)
    # the resumed run clears the debris and finishes
    resumed = llm_train.train_llm(args(tiny_llama, pairs_csv, out, resume_from="latest"), progress=False)
    assert resumed.steps == 12 and not list(out.glob(".tmp-*"))


# ---- real faults: a full filesystem, a file-size limit, an address-space limit ------------------------------


def _checkpoint_parts(n_params: int):
    """A model whose trainable file is 4 x n_params bytes and whose Adam state (optimizer.pt) twice that."""
    model = torch.nn.Linear(n_params // 64, 64, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, n_params // 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched, load_config(None, ["base_model=x"])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real filesystem that fills up: a tmpfs of the size asked for (needs root to mount)."""
    mounted = []

    def mount(size_kb: int):
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    import gc

    gc.collect()  # a failed torch.save leaves its file open until its writer is collected
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)  # detached now, freed when the file closes


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="mounting a tmpfs needs root; the file-size-limit test below covers the real writers")
@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_really_full_disk_keeps_the_previous_checkpoint(small_tmpfs, writer):
    # one checkpoint: ~400 KB trainable.safetensors + ~800 KB optimizer.pt. The second one runs out of space
    # in the first write (safetensors' own error) or in the second (torch.save's RuntimeError, which names
    # no cause) depending on the room left.
    model, opt, sched, cfg = _checkpoint_parts(100_000)
    out = small_tmpfs(1400 if writer == "safetensors" else 1700)
    first = checkpoint.save_checkpoint(out, checkpoint.Position(step=1), model, opt, sched, cfg)
    with pytest.raises(checkpoint.DiskFullError) as err:
        checkpoint.save_checkpoint(out, checkpoint.Position(step=2), model, opt, sched, cfg)
    msg = str(err.value)
    assert msg.startswith(f"disk full while writing checkpoint {out / 'checkpoint-000002'}. A checkpoint needs about")
    assert f"The previous checkpoint {first} is intact" in msg
    assert checkpoint.verify_checkpoint(first) is None
    assert [p.name for p in out.iterdir()] == ["checkpoint-000001"]  # no half-written folder left


FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_faults import _checkpoint_parts
from lora_scripts.train import checkpoint
model, opt, sched, cfg = _checkpoint_parts(100_000)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    checkpoint.save_checkpoint(Path({out!r}), checkpoint.Position(step=1), model, opt, sched, cfg)
except checkpoint.DiskFullError as exc:
    print(exc)
"""


def test_a_file_size_limit_is_reported_as_such(tmp_path):
    script = FILE_SIZE_LIMIT.format(tests=str(__import__("pathlib").Path(__file__).parent), out=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"file size limit reached (ulimit -f) while writing checkpoint "
                                  f"{tmp_path / 'checkpoint-000001'}"), done.stdout
    assert "No earlier checkpoint exists" in done.stdout and not list(tmp_path.iterdir())


CPU_OOM = """
import resource, sys, torch
from lora_scripts.config_file import load_config
from lora_scripts.train.errors import TrainingStopped
from lora_scripts.train.run import start_run
cfg = load_config(None, ["base_model=x", "output_dir={out}", "batch_size=8", "mixed_precision=no"])
try:
    with start_run(cfg, "llm", progress=False):
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20), resource.RLIM_INFINITY))
        torch.empty(1 << 30, dtype=torch.uint8)  # 1 GiB past a 256 MiB margin: the CPU allocator refuses
except TrainingStopped as exc:
    print(exc)
"""


def test_cpu_out_of_memory_gets_the_advice(tmp_path):
    done = subprocess.run([sys.executable, "-c", CPU_OOM.format(out=tmp_path / "oom")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("out of memory. Try, in this order:"), done.stdout + done.stderr
    assert "batch_size: 8 -> 4" in done.stdout


def test_checkpoints_are_written_where_folders_cannot_be_opened(tmp_path, monkeypatch):
    # Windows has no O_DIRECTORY and refuses os.open on a folder; the folder fsync is skipped there
    model, opt, sched, cfg = _checkpoint_parts(6400)
    monkeypatch.delattr(checkpoint.os, "O_DIRECTORY")
    path = checkpoint.save_checkpoint(tmp_path, checkpoint.Position(step=3), model, opt, sched, cfg)
    assert checkpoint.verify_checkpoint(path) is None


@pytest.mark.parametrize("name", ["../outside", "sub/../../outside", "/etc/outside", "C:\\\\loras\\\\outside",
                                  "..\\\\outside"])
def test_lora_tags_stay_inside_the_lora_dir(tmp_path, name):
    from lora_scripts.sd_generate import LoraTagError, resolve_lora_name

    inside = tmp_path / "loras"
    (inside / "styles").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (inside / "styles" / "night.safetensors").write_bytes(b"")
    assert resolve_lora_name("styles/night", inside) == inside / "styles" / "night.safetensors"
    with pytest.raises(LoraTagError, match="looked up inside --lora-dir"):
        resolve_lora_name(name, inside)


def test_resume_refuses_other_settings_or_data_and_names_them(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "run"
    llm_train.train_llm(args(tiny_llama, pairs_csv, out, epochs=1), progress=False)  # checkpoints at 2, 4, 6
    with pytest.raises(checkpoint.ResumeError) as err:
        llm_train.train_llm(args(tiny_llama, pairs_csv, out, epochs=2, resume_from="latest", lora_dropout=0.1,
                                 lora_rank=4), progress=False)
    msg = str(err.value)
    assert f"resume_from: {out / 'checkpoint-000006'} was written by a run with other settings or data" in msg
    assert "lora_dropout: 0.0 at the checkpoint, 0.1 now" in msg and "lora_rank: 8 at the checkpoint, 4 now" in msg
    assert "lora_alpha: 16.0 at the checkpoint, 8.0 now" in msg and "resume_force: true" in msg

    rows = pairs_csv.read_text().splitlines()
    pairs_csv.write_text("\n".join(rows[:-1]) + "\n")  # one pair fewer
    with pytest.raises(checkpoint.ResumeError, match="the training data: 24 samples at the checkpoint, 23 now"):
        llm_train.train_llm(args(tiny_llama, pairs_csv, out, epochs=2, resume_from="latest"), progress=False)
    forced = llm_train.train_llm(args(tiny_llama, pairs_csv, out, epochs=2, resume_from="latest",
                                      resume_force="true"), progress=False)
    warnings = [e["message"] for e in forced.events if e["event"] == "warning"]
    assert "resume_force: continuing although the training data: 24 samples at the checkpoint, 23 now" in warnings

    pairs_csv.write_text("\n".join(rows) + "\n")
    out2 = tmp_path / "longer"
    llm_train.train_llm(args(tiny_llama, pairs_csv, out2, epochs=1), progress=False)
    longer = llm_train.train_llm(args(tiny_llama, pairs_csv, out2, epochs=2, save_steps=3, resume_from="latest"),
                                 progress=False)  # more epochs, other save_steps: the same run, continued
    assert [e["step"] for e in longer.events if e["event"] == "step"][0] == 7 and longer.steps == 12
