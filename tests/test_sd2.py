"""SD 2.x: what the model predicts comes from the checkpoint or from v_parameterization, never a guess; its
OpenCLIP text encoder is written in its own layout; train -> export -> load -> merge, for both kinds."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_scripts.cli import main
from lora_scripts.config_file import load_config
from lora_scripts.models.detect import declared_prediction_type, detect_model_type
from lora_scripts.models.sd import SDLoadError, build_tiny_sd, load_sd, save_single_file
from lora_scripts.preflight import run_preflight
from lora_scripts.train.sd import train_sd


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2")
    return save_single_file(build_tiny_sd("sd2"), folder / "tiny-sd2.safetensors", folder / "config")


def outputs(pipe):
    ids = pipe.tokenizer(["a neon city"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.to(pipe.unet.device)).last_hidden_state
        x = torch.randn(1, 4, 16, 16, generator=g).to(pipe.unet.device)
        return pipe.unet(x, torch.tensor([400], device=pipe.unet.device), hidden).sample.cpu(), hidden.cpu()


def test_the_text_encoder_is_written_as_openclip_and_sniffed_as_sd2(tiny_sd2):
    ckpt, cfg_dir = tiny_sd2
    keys = set(load_file(ckpt))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)  # not the CLIP-L layout
    assert detect_model_type(str(ckpt)) == "sd2"


def test_prediction_type_is_declared_or_asked_for(tiny_sd2, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd2
    args = [f"base_model={ckpt}", f"model_config_dir={cfg_dir}", f"train_data_dir={style_images}",
            f"output_dir={tmp_path / 'o'}", "resolution=128"]
    report = run_preflight(load_config(None, args))
    assert any("an SD 2.x checkpoint that does not say what it predicts" in e and "v_parameterization: true" in e
               for e in report.errors)
    assert report.model_type == "sd2"
    assert not any("predicts" in e for e in run_preflight(load_config(None, [*args, "v_parameterization=false"])).errors)
    with pytest.raises(SDLoadError, match="does not say what it predicts"):
        load_sd(str(ckpt), "sd2", cfg_dir)
    for flag, expected in ((False, "epsilon"), (True, "v_prediction")):
        model = load_sd(str(ckpt), "sd2", cfg_dir, v_parameterization=flag)
        assert model.prediction_type == model.pipe.scheduler.config.prediction_type == expected  # the sampler too
    # what a checkpoint declares: modelspec metadata, or ComfyUI's v_pred marker key
    state = load_file(ckpt)
    save_file(state, tmp_path / "eps.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    save_file({**state, "v_pred": torch.zeros(0)}, tmp_path / "v.safetensors")
    assert declared_prediction_type(str(tmp_path / "eps.safetensors")) == "epsilon"
    assert declared_prediction_type(str(tmp_path / "v.safetensors")) == "v_prediction"
    assert load_sd(str(tmp_path / "v.safetensors"), "sd2", cfg_dir).pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("v", [False, True])
def test_train_export_load_and_merge(tiny_sd2, style_images, tmp_path, v):
    ckpt, cfg_dir = tiny_sd2
    cfg = load_config(None, [f"base_model={ckpt}", f"model_config_dir={cfg_dir}", f"train_data_dir={style_images}",
                             f"output_dir={tmp_path / 'run'}", "resolution=128", "batch_size=2", "max_train_steps=2",
                             "repeats=1", "learning_rate=1e-2", "text_encoder_lr=1e-2", "save_precision=fp32",
                             "sample_every_n_epochs=null", "mixed_precision=no", f"v_parameterization={v}"])
    result = train_sd(cfg, progress=False)
    start = next(e for e in result.events if e["event"] == "start")
    assert start["model_type"] == "sd2" and start["prediction_type"] == ("v_prediction" if v else "epsilon")
    expected = outputs(result.model.pipe)
    base = outputs(load_sd(str(ckpt), "sd2", cfg_dir, v_parameterization=v).pipe)
    assert float((expected[0] - base[0]).abs().max()) > 1e-3 and float((expected[1] - base[1]).abs().max()) > 1e-3

    pipe = load_sd(str(ckpt), "sd2", cfg_dir, v_parameterization=v).pipe
    pipe.load_lora_weights(str(result.lora_file.parent), weight_name=result.lora_file.name)
    for got, want in zip(outputs(pipe), expected):
        assert float((got - want).abs().max()) <= 1e-5

    merged = tmp_path / "merged.safetensors"
    flag = "--v-parameterization" if v else "--no-v-parameterization"
    assert main(["merge", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora", str(result.lora_file),
                 "--out", str(merged), flag]) == 0
    assert detect_model_type(str(merged)) == "sd2"  # still OpenCLIP, not the CLIP-L layout
    reloaded = load_sd(str(merged), "sd2", cfg_dir)  # no flag: the merged file says what it predicts
    assert reloaded.prediction_type == ("v_prediction" if v else "epsilon")
    for got, want in zip(outputs(reloaded.pipe), expected):
        assert float((got - want).abs().max()) <= 1e-4
