"""Faults injected for real: a busy output folder, a full disk, NaN, out of memory, forged files, bad paths."""

import errno
import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_scripts.config import ConfigError, load_config
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
from lora_scripts.config import load_config
from lora_scripts.train import checkpoint, llm
real = checkpoint.torch.save
def save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    if "checkpoint-000004" in str(path) and str(path).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-write: optimizer saved, scheduler/rng/COMPLETE not yet
checkpoint.torch.save = save
llm.train_llm(load_config(None, {[f"base_model={tiny_llama}", f"metadata_path={pairs_csv}", f"output_dir={out}",
                                  "epochs=2", "batch_size=4", "save_steps=2"]!r}), progress=False)
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
