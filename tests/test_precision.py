"""Precision follows the machine, and the fp16 path works: loss scaling in the one optimizer step both loops
share, run here on the CPU with torch's real GradScaler (the same class accelerate uses on a GPU)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts import hardware
from lora_scripts.config import ConfigError
from lora_scripts.config_file import load_config
from lora_scripts.train.checkpoint import Position
from lora_scripts.train.errors import TrainingStopped
from lora_scripts.train.run import MAX_OVERFLOW_SKIPS, TrainingRun, start_accelerator


def test_auto_is_what_this_machine_computes_fast():
    cfg, accelerator = start_accelerator(load_config(None, ["base_model=x"]))
    assert load_config(None, ["base_model=x"]).mixed_precision == "auto"  # the default
    if torch.cuda.is_available():
        assert cfg.mixed_precision == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert cfg.mixed_precision == ("bf16" if native else "no")
    assert accelerator.mixed_precision == cfg.mixed_precision
    chosen = hardware.choose_precision("auto")
    assert chosen.name == cfg.mixed_precision and chosen.reason
    assert hardware.choose_precision("bf16").name == "bf16"  # an explicit choice is kept


@pytest.mark.skipif(torch.cuda.is_available() or hardware.cpu_has_bf16_units(),
                    reason="the warning is for CPUs without bf16 units; this machine has them (or a GPU)")
def test_explicit_bf16_on_a_cpu_without_bf16_units_is_warned_with_the_slowdown():
    assert hardware.choose_precision("auto").label == "fp32"
    assert "~45x slower" in hardware.choose_precision("auto").reason
    assert "~45x slower than fp32" in hardware.precision_warning("bf16")
    assert hardware.precision_warning("no") is None


@pytest.mark.parametrize("word", ["no", "No", "off", "false"])
def test_yaml_no_means_no(tmp_path, word):
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: x\nmixed_precision: {word}\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["base_model=x", f"mixed_precision={word}"]).mixed_precision == "no"


def test_a_yes_word_where_none_is_valid_says_what_yaml_did(tmp_path):
    with pytest.raises(ConfigError, match="got True.*YAML reads an unquoted yes/no"):
        load_config(None, ["base_model=x", "mixed_precision=yes"])


# ---- the shared optimizer step under fp16 loss scaling ---------------------------------------------------


def fp16_run(tmp_path, **cfg):
    """A TrainingRun over a 4x4 linear layer under fp16 autocast with a real GradScaler (scale 2^16)."""
    config = load_config(None, ["base_model=x", f"output_dir={tmp_path / 'run'}", "mixed_precision=fp16",
                                "learning_rate=0.1", "scheduler=constant", "save_steps=1000",
                                *[f"{k}={v}" for k, v in cfg.items()]])
    config, accelerator = start_accelerator(config)
    assert accelerator.scaler is not None and accelerator.scaler.get_scale() == 2.0**16
    layer = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.constant_(layer.weight, 0.25)
    optimizer = torch.optim.SGD(layer.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    layer, optimizer, scheduler = accelerator.prepare(layer, optimizer, scheduler)
    run = TrainingRun(config, accelerator, "llm", progress=False).__enter__()
    run.track([layer], layer, list(layer.parameters()), optimizer, scheduler, total_steps=1000)
    return run, layer, accelerator


def fp16_step(run, layer, accelerator, pos, loss_factor: float):
    """loss = factor x sum(W x) for x = 0.5: d loss / d output = factor, times the loss scale in fp16."""
    x = torch.full((1, 4), 0.5, device=accelerator.device)
    with run.micro_batch(last=True), accelerator.autocast():
        loss = layer(x).float().sum() * loss_factor  # the layer's matmul runs in fp16 (autocast)
        run.backward(loss, 1)
    run.step(pos, loss.detach(), {"samples": 1}, rate="samples")
    return run.events.history[-1]


def test_an_fp16_overflow_is_skipped_the_scale_halves_and_the_next_step_applies(tmp_path):
    run, layer, accelerator = fp16_run(tmp_path, max_grad_norm=1.0)
    pos = Position()
    before = layer.weight.detach().clone()
    # The gradient of the output is 1 x 2^16 = 65536 in fp16, past its largest value (65504): a real overflow
    first = fp16_step(run, layer, accelerator, pos, 1.0)
    assert first["skipped"] and first["skipped_steps"] == 1 and math.isinf(first["grad_norm"])
    assert first["loss_scale"] == 2.0**15 and torch.equal(layer.weight, before)  # nothing applied
    # At 2^15 every gradient fits: the step applies, with the true (unscaled) gradient: 0.5 per weight
    second = fp16_step(run, layer, accelerator, pos, 1.0)
    assert not second["skipped"] and second["skipped_steps"] == 1 and pos.step == 2
    assert second["grad_norm"] == pytest.approx(2.0)  # sqrt(16 x 0.5^2), not 2^15 times that
    # clipped to norm 1 (each gradient 0.5 -> 0.25), then SGD at lr 0.1
    assert torch.allclose(layer.weight, before - 0.1 * 0.25)
    assert run.skipped_steps == 1
    run.__exit__(None, None, None)


def test_fp16_overflows_without_end_stop_the_run_with_a_diagnosis(tmp_path):
    run, layer, accelerator = fp16_run(tmp_path)
    pos = Position()
    with pytest.raises(TrainingStopped) as err:
        for _ in range(MAX_OVERFLOW_SKIPS + 1):
            # 2^20 x the loss scale overflows fp16 at every scale the scaler tries (2^16 down to 2^6)
            fp16_step(run, layer, accelerator, pos, 2.0**20)
    msg = str(err.value)
    assert f"overflowed fp16 in {MAX_OVERFLOW_SKIPS + 1} steps in a row" in msg and "mixed_precision: bf16" in msg
    assert "no checkpoint was written yet" in msg.lower()
    assert accelerator.scaler.get_scale() == 2.0 ** (16 - MAX_OVERFLOW_SKIPS - 1)
    run.__exit__(TrainingStopped, err.value, None)


def test_a_nan_loss_under_fp16_is_still_the_nan_guards(tmp_path):
    run, layer, accelerator = fp16_run(tmp_path, skip_nan_steps=1)
    pos = Position()
    nan = fp16_step(run, layer, accelerator, pos, float("nan"))
    assert nan["skipped"] and run.nan_guard.skipped == 1
    ok = fp16_step(run, layer, accelerator, pos, 0.5)  # the scaler is usable again after the skipped step
    assert not ok["skipped"]
    with pytest.raises(TrainingStopped, match="loss became nan at step 3"):
        fp16_step(run, layer, accelerator, pos, float("nan"))
    run.__exit__(None, None, None)


# ---- both loops run fp16 through it ----------------------------------------------------------------------


def assert_loss_scaled_like_fp32(fp16, fp32, n_steps: int, rel: float) -> None:
    """Every fp16 step ran under loss scaling with no update skipped, and logged the true (unscaled) gradient
    norm: the fp32 run's within fp16's rounding, not 65536 times it."""
    steps = [e for e in fp16.events if e["event"] == "step"]
    assert [e["loss_scale"] for e in steps] == [2.0**16] * n_steps and fp16.skipped_steps == 0
    assert all(math.isfinite(e["loss"]) for e in steps)
    fp32_norms = [e["grad_norm"] for e in fp32.events if e["event"] == "step"]
    assert [e["grad_norm"] for e in steps] == pytest.approx(fp32_norms, rel=rel)


def test_llm_loop_trains_in_fp16_with_loss_scaling_and_resumes_its_scale(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    from lora_scripts.train.llm import train_llm

    # a fresh cache: the drift check generates the base model's answers in this run, with the frozen weights in
    # fp16 (an earlier test's cached answers once hid that this generation ran outside autocast and failed)
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))

    def cfg(out, precision, **kw):
        return load_config(None, [f"{k}={v}" for k, v in {
            "base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": tmp_path / out, "batch_size": 4,
            "max_train_steps": 3, "learning_rate": 5e-3, "mixed_precision": precision, "save_steps": 2,
            "sample_prompts": "[]", **kw}.items()])

    fp16 = train_llm(cfg("fp16", "fp16"), progress=False)
    assert_loss_scaled_like_fp32(fp16, train_llm(cfg("fp32", "no"), progress=False), 3, rel=0.02)
    state = json.loads((tmp_path / "fp16" / "checkpoint-000002" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0**16
    adapter = load_file(tmp_path / "fp16" / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    end = next(e for e in fp16.events if e["event"] == "end")
    assert end["precision"] == "fp16" and end["skipped_steps"] == 0


def test_sd_loop_trains_in_fp16_with_loss_scaling(tiny_sd15, style_images, tmp_path):
    from lora_scripts.train.sd import train_sd

    ckpt, cfg_dir = tiny_sd15

    def cfg(out, precision):
        return load_config(None, [f"{k}={v}" for k, v in {
            "base_model": ckpt, "model_config_dir": cfg_dir, "model_type": "sd15", "train_data_dir": style_images,
            "output_dir": tmp_path / out, "resolution": 64, "batch_size": 2, "max_train_steps": 2, "lora_rank": 4,
            "text_encoder_lr": 1e-4, "mixed_precision": precision, "sample_every_n_epochs": "null",
            "save_precision": "fp32"}.items()])

    fp16 = train_sd(cfg("fp16", "fp16"), progress=False)
    assert_loss_scaled_like_fp32(fp16, train_sd(cfg("fp32", "no"), progress=False), 2, rel=0.05)
    lora = load_file(fp16.lora_file)
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
