"""End-to-end LLM training on a tiny Llama built in code: outputs, resume, NaN, DDP, export."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_scripts.config_file import load_config
from lora_scripts.data import text as td
from lora_scripts.hardware import device_type
from lora_scripts.train import llm as llm_train
from lora_scripts.train.checkpoint import list_checkpoints, verify_checkpoint
from lora_scripts.train.errors import TrainingStopped


def overrides(model, data, out, **kw):
    base = {"base_model": model, "metadata_path": data, "output_dir": out, "epochs": 3, "batch_size": 4,
            "learning_rate": 5e-3, "save_steps": 100, "max_new_tokens": 8, "seed": 7,
            "mixed_precision": "no"}  # fp32 numbers on every machine (auto is bf16 where the CPU has bf16 units)
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def test_training_learns_and_writes_every_output(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_llama, pairs_csv, out, epochs=6, learning_rate=2e-2, val_ratio=0.25,
                                      save_steps=5, target_modules="all-linear", sample_every_n_epochs=4))
    result = llm_train.train_llm(cfg, progress=False)
    steps = [e for e in result.events if e["event"] == "step"]
    assert result.steps == len(steps) == 6 * 5  # 18 train samples -> 5 batches of 4 per epoch
    first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
    assert last < first * 0.9, (first, last)
    for name in ["adapter_model.safetensors", "adapter_config.json", "config.yaml", "events.jsonl",
                 "loss_curve.png", "samples.md"]:
        assert (out / name).exists(), name
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000020", "checkpoint-000025", "checkpoint-000030"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(out))
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    # sample_every_n_epochs=4 of 6: after epoch 4, then at the end
    headings = [line for line in (out / "samples.md").read_text().splitlines() if line.startswith("## ")]
    assert headings == ["## epoch 4, step 20", "## end of training, step 30"]
    start = next(e for e in result.events if e["event"] == "start")
    assert start["packed"] is True and start["total_steps"] == 30
    assert all(s["tokens_per_s"] > 0 for s in steps)
    # tokens count the real ones; the filler rounds each packed row up to the device's shape multiple: 32 on
    # the CPU (oneDNN compiles a kernel per new shape), 8 on CUDA (tensor-core sizes)
    multiple = 32 if device_type() == "cpu" else 8
    assert llm_train.shape_multiple(device_type()) == multiple
    assert all((s["tokens"] + s["filler_tokens"]) % multiple == 0 and 0 <= s["filler_tokens"] < multiple for s in steps)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_packed_loss_equals_token_weighted_loss_of_single_samples(tiny_llama, pairs_csv):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    items = [td.tokenize_sample(tok, s, 256) for s in td.load_samples(pairs_csv)[:4]]
    with torch.no_grad():
        packed, n = llm_train.causal_lm_loss(model, td.collate_packed(items))
        singles = [llm_train.causal_lm_loss(model, td.collate_packed([t])) for t in items]
        padded, n_pad = llm_train.causal_lm_loss(model, td.collate_padded(items, tok.pad_token_id))
    weighted = sum(loss * k for loss, k in singles) / sum(k for _, k in singles)
    assert n == n_pad == sum(k for _, k in singles)
    assert abs(float(packed) - float(weighted)) < 1e-5
    assert abs(float(padded) - float(weighted)) < 1e-5


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lora_scripts.config_file import load_config
    from lora_scripts.train.llm import train_llm
    kill_at = int(sys.argv[1])
    def on_event(e):
        if e["event"] == "step" and e["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train_llm(load_config(None, sys.argv[2:]), callback=on_event, progress=False)
""")


def run_script(kill_at, args):
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(kill_at), *args], capture_output=True, text=True)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_llama, pairs_csv, tmp_path):
    # dropout and accumulation make the RNG state and the group position matter; 3 steps per epoch, 9 in all
    common = dict(save_steps=2, lora_dropout=0.1, gradient_accumulation_steps=2, epochs=3)
    # the killed run in a process of its own; the uninterrupted run and the resume in this one (each builds its
    # model, optimizer and data from the files, so nothing but the checkpoint carries over)
    llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "full", **common)), progress=False)

    killed_dir = tmp_path / "killed"
    killed = run_script(5, overrides(tiny_llama, pairs_csv, killed_dir, **common))
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(killed_dir)] == ["checkpoint-000002", "checkpoint-000004"]
    assert not (killed_dir / "adapter_model.safetensors").exists()

    llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, killed_dir, resume_from="latest", **common)),
                        progress=False)
    events = [json.loads(line) for line in (killed_dir / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 4]
    steps_after_resume = [e["step"] for e in events[events.index(starts[1]):] if e["event"] == "step"]
    assert steps_after_resume == [5, 6, 7, 8, 9]

    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(killed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst


def test_nan_loss_stops_with_step_and_last_checkpoint(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = llm_train.causal_lm_loss

    def poisoned(model, batch):
        loss, n = real(model, batch)
        if not model.training:  # evaluations (eval loss, the drift check) are not training steps
            return loss, n
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    monkeypatch.setattr(llm_train, "causal_lm_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped) as err:
        llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, out, save_steps=2)), progress=False)
    msg = str(err.value)
    assert "loss became nan at step 3" in msg and "learning rate" in msg
    assert str(out / "checkpoint-000002") in msg
    assert verify_checkpoint(out / "checkpoint-000002") is None
    assert not (out / "adapter_model.safetensors").exists()


def test_launch_commands(tmp_path):
    """`--num-processes N` alone: torchrun on this machine; with an accelerate config: `accelerate launch`
    with the file, N overriding its count; a missing file is named."""
    from lora_scripts.launch import LaunchError, launch_command

    train = ["--config", "c.yaml", "lr=1"]
    assert launch_command(4, train)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                                            "-m", "lora_scripts.cli", "train", *train]
    acc = tmp_path / "ddp.yaml"
    acc.write_text("distributed_type: MULTI_GPU\n")
    assert launch_command(1, train, str(acc))[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(acc),
                                                      "-m", "lora_scripts.cli", "train", *train]
    assert "--num_processes=8" in launch_command(8, train, str(acc))
    with pytest.raises(LaunchError, match="no-such.yaml: no such file"):
        launch_command(2, train, str(tmp_path / "no-such.yaml"))


def test_sharded_launches_are_refused_before_any_work():
    """What a run does under each of accelerate's distributed types: data-parallel and single-process types
    train, sharded ones are refused, also when accelerate turned an FSDP/DeepSpeed launch on CPUs into plain
    data parallel (its environment says what the launch asked for; seen with accelerate 1.15: a 2-process
    FSDP launch on this CPU machine ran as MULTI_CPU with ACCELERATE_USE_FSDP=true)."""
    from accelerate.utils import DistributedType

    from lora_scripts.launch import check_distributed_type
    from lora_scripts.train.errors import UnsupportedLaunchError

    refused = []
    for kind in DistributedType:
        try:
            check_distributed_type(str(kind.value), environ={})
        except UnsupportedLaunchError as exc:
            assert "configs/accelerate/ddp.yaml" in str(exc)
            refused.append(kind.value)
    assert sorted(refused) == ["DEEPSPEED", "FSDP", "MEGATRON_LM"]
    # an FSDP config launched on CPUs: accelerate makes it MULTI_CPU, its environment still says FSDP
    for asked in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        with pytest.raises(UnsupportedLaunchError, match="shards the model"):
            check_distributed_type("MULTI_CPU", environ={asked: "true"})
    check_distributed_type("MULTI_CPU", environ={"ACCELERATE_USE_FSDP": "false"})


def test_weighted_adapters_apply_the_weighted_sum_of_updates(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_scripts.tools.model_ops import export_merged

    deltas = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 6)]):
        torch.manual_seed(i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        m.save_pretrained(tmp_path / f"a{i}")
        sd = load_file(tmp_path / f"a{i}" / "adapter_model.safetensors")
        deltas.append({k.replace(".lora_A.weight", ""): (sd[k.replace("lora_A", "lora_B")] @ sd[k]) * alpha / r
                       for k in sd if "lora_A" in k})
    export_merged(str(tiny_llama), [(tmp_path / "a0", 0.5), (tmp_path / "a1", 2.0)], tmp_path / "mix")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "mix").state_dict()
    checked = 0
    for key, d0 in deltas[0].items():
        weight = key.replace("base_model.model.", "") + ".weight"
        expected = base[weight] + 0.5 * d0 + 2.0 * deltas[1][key]
        torch.testing.assert_close(mixed[weight], expected, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked == 4  # q_proj and v_proj in 2 layers


@pytest.mark.parametrize("lora_type", ["dora", "rslora"])
def test_dora_and_rslora_train(tiny_llama, pairs_csv, tmp_path, lora_type):
    out = tmp_path / lora_type
    llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, out, epochs=1, lora_type=lora_type)),
                        progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is (lora_type == "dora") and config["use_rslora"] is (lora_type == "rslora")
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in keys) is (lora_type == "dora")


def test_cli_train_runs_preflight_first(tiny_llama, tmp_path, capsys):
    from lora_scripts.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tiny_llama}\nmetadata_path: {tmp_path / 'missing.csv'}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing.csv: not found" in err and "nothing was trained" in err
    assert not (tmp_path / "o").exists()
    os.environ.pop("LOCAL_RANK", None)


def test_gradient_checkpointing_gives_the_same_training(tiny_llama, pairs_csv, tmp_path):
    runs = {}
    for gc in (False, True):
        cfg = load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / str(gc), epochs=1,
                                          gradient_checkpointing=str(gc).lower()))
        runs[gc] = [e["loss"] for e in llm_train.train_llm(cfg, progress=False).events if e["event"] == "step"]
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


def test_save_best_keeps_the_adapter_of_the_lowest_eval_loss(tiny_llama, pairs_csv, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "best_run"
    cfg = load_config(None, overrides(tiny_llama, pairs_csv, out, epochs=3, learning_rate=2e-2, val_ratio=0.25,
                                      save_steps=5, save_total_limit="null", save_best="true"))
    result = llm_train.train_llm(cfg, progress=False)
    assert [s for s, _ in result.eval_losses] == [0, 5, 10, 15]
    best_step, best_loss = min(result.eval_losses[1:], key=lambda e: e[1])
    end = next(e for e in result.events if e["event"] == "end")
    assert (end["best_step"], end["best_epoch"], end["best_eval_loss"]) == (best_step, best_step // 5, best_loss)
    best = load_file(out / "best" / "adapter_model.safetensors")
    at_best = load_file(out / f"checkpoint-{best_step:06d}" / "adapter_model.safetensors")
    assert best.keys() == at_best.keys() and all(best[k].equal(at_best[k]) for k in best)
    assert (out / "best" / "adapter_config.json").exists() and not list(out.glob(".tmp-*"))


def test_retention_rises_as_a_run_over_trains_and_warns_once(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    from lora_scripts.train import drift

    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(drift, "cache_root", lambda: tmp_path / "cache")
    # the tiny random model's figures: 8.3 for the base's own answers, 10.9 after 8 over-trained epochs (1.3x);
    # a real model starts far lower (README), so the warning factor is lowered here to see it fire once
    monkeypatch.setattr(drift, "DRIFT_FACTOR", 1.15)
    result = llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "run", epochs=8,
                                                             learning_rate=2e-2)), progress=False)
    evals = [e for e in result.events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [6 * i for i in range(9)] and "eval_loss" not in evals[0]  # no eval data
    values = [e["retention"] for e in evals]
    assert values[0] == evals[0]["retention_base"] and values[-1] > 1.2 * values[0], values
    assert values[-1] > values[1]  # still rising after the first epoch
    warnings = [e["message"] for e in result.events if e["event"] == "warning" and "retention" in e["message"]]
    assert len(warnings) == 1 and "drifting toward the training data" in warnings[0] and "fewer epochs" in warnings[0]
    cached = list((tmp_path / "cache" / "drift").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == len(drift.drift_prompts())
    again = llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "again", epochs=1)),
                                progress=False)
    assert next(e for e in again.events if e["event"] == "eval")["retention"] == values[0]  # same answers, read back
