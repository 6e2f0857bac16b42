"""The image workflow as the description walks it: YAML → train.py → <lora:cyberpunk_night:0.8>."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import write_description_config
from lora_scripts.cli import main
from lora_scripts.sd_generate import parse_lora_tags


def test_train_then_generate_with_webui_lora_syntax(tiny_sd15, style_images, tmp_path, capsys):
    ckpt, cfg_dir = tiny_sd15
    out = tmp_path / "output" / "cyberpunk_night"
    cfg = write_description_config(tmp_path / "cyberpunk.yaml", style_images, ckpt, out, model_config_dir=cfg_dir,
                                   lora_rank=4, lora_alpha=8, batch_size=2, epochs=1, resolution=128, repeats=2,
                                   trigger_word="cybr_night")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "<lora:cyberpunk_night:0.8>" in text.out
    assert "preflight: 0 error(s)" in text.err
    lora = out / "cyberpunk_night.safetensors"
    with safe_open(str(lora), "pt") as fh:
        md = fh.metadata()
    assert md["ss_output_name"] == "cyberpunk_night" and '"cybr_night": 6' in md["ss_tag_frequency"]
    assert list((out / "logs").glob("events.out.tfevents.*"))

    code = main(["generate", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora-dir", str(out),
                 "--prompt", "<lora:cyberpunk_night:0.8>, futuristic cityscape, neon lights", "--steps", "2",
                 "--width", "64", "--height", "64", "--out", str(tmp_path / "gen")])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("futuristic cityscape, neon lights <cyberpunk_night.safetensors:0.8>")
    assert (tmp_path / "gen" / "000_seed0.png").exists()
    # --same-seed (the UI's strength x prompt grid): strength 0 is the base model itself, 1 is not
    code = main(["generate", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora-dir", str(out),
                 "--prompt", "neon", "--prompt", "neon <lora:cyberpunk_night:0>", "--prompt", "neon <lora:cyberpunk_night:1>",
                 "--same-seed", "--seed", "7", "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "xy")])
    assert code == 0
    capsys.readouterr()
    plain, zero, one = (np.asarray(Image.open(tmp_path / "xy" / f"{i:03d}_seed7.png")) for i in range(3))
    assert np.array_equal(plain, zero) and not np.array_equal(plain, one)
    code = main(["generate", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora-dir", str(out),
                 "--prompt", "<lora:missing_style:1>, x", "--steps", "1", "--out", str(tmp_path / "gen")])
    assert code == 2 and "no missing_style.safetensors" in capsys.readouterr().err


def test_lora_tag_parsing():
    assert parse_lora_tags("<lora:cyberpunk_night:0.8>, futuristic city") == (
        "futuristic city", [("cyberpunk_night", 0.8)])
    assert parse_lora_tags("a <lora:a> b <lora:b:-0.5>") == ("a b", [("a", 1.0), ("b", -0.5)])


def test_sdxl_trains_and_exports_sgm_names(tmp_path, style_images):
    from lora_scripts.config_file import load_config
    from lora_scripts.models.sd import build_tiny_sd, load_sd, save_single_file
    from lora_scripts.tools.ops import convert
    from lora_scripts.train.sd import train_sd

    # saved as an original-layout single file, like sd_xl_base_1.0.safetensors
    ckpt, cfg_dir = save_single_file(build_tiny_sd("sdxl"), tmp_path / "tiny-sdxl.safetensors",
                                     tmp_path / "tiny-sdxl-config")
    cfg = load_config(None, [f"base_model={ckpt}", f"model_config_dir={cfg_dir}", f"train_data_dir={style_images}",
                             f"output_dir={tmp_path / 'xl'}", "resolution=64", "batch_size=2", "max_train_steps=2",
                             "repeats=1", "lora_rank=4", "lora_alpha=6", "text_encoder_lr=1e-2", "learning_rate=1e-2", "save_precision=fp32",
                             "sample_every_n_epochs=null", "mixed_precision=bf16"])
    result = train_sd(cfg, progress=False)
    # trained with its frozen UNet layers in bf16; the fp32 ones read back from the single file on request
    assert result.trained_model.unet.conv_in.weight.dtype == torch.bfloat16
    assert result.model.unet.conv_in.weight.dtype == torch.float32
    with safe_open(str(result.lora_file), "pt") as fh:
        keys, md = set(fh.keys()), fh.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in keys)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"

    def unet_out(pipe):  # on the pipeline's device (the trained one is on the GPU where there is one)
        dev = pipe.unet.device
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g).to(dev)
        hidden = torch.randn(1, 77, 32 + 48, generator=g).to(dev)  # both encoders' widths
        cond = {"text_embeds": torch.randn(1, 48, generator=g).to(dev),
                "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]], device=dev)}
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([400], device=dev), hidden, added_cond_kwargs=cond).sample.cpu()

    expected = unet_out(result.model.pipe)
    # the diffusers file written from the live model at export, and the one `convert` writes from the kohya file
    converted = convert(result.lora_file, tmp_path / "converted", "diffusers", cfg_dir)
    for file in [result.lora_file, result.diffusers_file, converted]:
        pipe = load_sd(str(ckpt), "sdxl", cfg_dir).pipe
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        assert float((unet_out(pipe) - expected).abs().max()) <= 1e-5, file.name

    # The WebUI's way: the kohya file applied to the original-layout checkpoint (both text encoders and the
    # UNet), then loaded as the WebUI's merged model would be
    state = load_file(ckpt)
    assert a1111_apply_sgm(state, load_file(result.lora_file)) == len({k.split(".")[0] for k in keys})
    save_file(state, tmp_path / "a1111-merged.safetensors")
    merged = load_sd(str(tmp_path / "a1111-merged.safetensors"), "sdxl", cfg_dir).pipe
    base = load_sd(str(ckpt), "sdxl", cfg_dir).pipe
    assert float((unet_out(merged) - expected).abs().max()) <= 1e-4 < 1e-3 < float((unet_out(base) - expected).abs().max())
    trained = result.model.pipe
    for tok, te_trained, te_merged, te_base in [
            (merged.tokenizer, trained.text_encoder, merged.text_encoder, base.text_encoder),
            (merged.tokenizer_2, trained.text_encoder_2, merged.text_encoder_2, base.text_encoder_2)]:
        ids = tok(["a neon city"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            a = te_trained(ids.to(te_trained.device)).last_hidden_state.cpu()
            b = te_merged(ids).last_hidden_state
            untouched = te_base(ids).last_hidden_state
        assert float((a - b).abs().max()) <= 1e-5 < 1e-3 < float((a - untouched).abs().max())


def a1111_apply_sgm(state, lora, multiplier=1.0) -> int:
    """The WebUI's formula on an SDXL original-layout state dict, written independently of the exporter: a
    kohya key is the module path of the single file with '.' -> '_' (UNet under model.diffusion_model, TE1
    under conditioner.embedders.0.transformer); TE2 is OpenCLIP there, so q/k/v are the thirds of each
    attn.in_proj_weight, out_proj is attn.out_proj, fc1/fc2 are mlp.c_fc/mlp.c_proj."""
    import re

    targets = {}
    for key in state:
        for root, prefix in (("model.diffusion_model.", "lora_unet_"), ("conditioner.embedders.0.transformer.", "lora_te1_")):
            if key.startswith(root) and key.endswith(".weight"):
                targets[prefix + key[len(root):-len(".weight")].replace(".", "_")] = (key, None)
        m = re.fullmatch(r"(conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.)attn\.in_proj_weight", key)
        if m:
            block, name = m.group(1), f"lora_te2_text_model_encoder_layers_{m.group(2)}_"
            for part, q in enumerate("qkv"):
                targets[f"{name}self_attn_{q}_proj"] = (key, part)
            targets[f"{name}self_attn_out_proj"] = (f"{block}attn.out_proj.weight", None)
            targets[f"{name}mlp_fc1"] = (f"{block}mlp.c_fc.weight", None)
            targets[f"{name}mlp_fc2"] = (f"{block}mlp.c_proj.weight", None)
    applied = 0
    for down_key in [k for k in lora if k.endswith(".lora_down.weight")]:
        name = down_key[: -len(".lora_down.weight")]
        down, up, alpha = lora[down_key], lora[f"{name}.lora_up.weight"], float(lora[f"{name}.alpha"])
        delta = (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0] * multiplier
        key, part = targets[name]
        if part is None:
            state[key] += delta.reshape(state[key].shape).to(state[key].dtype)
        else:
            rows = state[key].shape[0] // 3
            state[key][part * rows:(part + 1) * rows] += delta.to(state[key].dtype)
        applied += 1
    return applied


@pytest.mark.parametrize("bad", ["pickle"])
def test_unsafe_ckpt_is_refused(tmp_path, bad):
    import pickle

    from lora_scripts.models.sd import SDLoadError, load_sd

    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(SDLoadError, match="could run code when loaded.*safetensors"):
        load_sd(str(path), "sd15")
