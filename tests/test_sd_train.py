"""Stable Diffusion LoRA training on tiny SD models built in code: train, sample, resume, export, reload."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.config_file import load_config
from lora_scripts.data import sd_data
from lora_scripts.data.buckets import make_buckets, nearest_bucket
from lora_scripts.models.sd import load_sd
from lora_scripts.train.sd import snr_weights, train_sd


def sd_args(ckpt, cfg_dir, images, out, **kw):
    base = {"base_model": ckpt, "model_config_dir": cfg_dir, "model_type": "sd15", "train_data_dir": images,
            "output_dir": out, "resolution": 128, "batch_size": 2, "epochs": 2, "repeats": 1, "lora_rank": 4,
            "lora_alpha": 12, "learning_rate": 1e-3, "save_steps": 4, "save_precision": "fp32", "seed": 3,
            "sample_every_n_epochs": 1, "mixed_precision": "no"}  # fp32 numbers on every machine
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    """One training run with a text-encoder LoRA and alpha != rank, shared by the export tests."""
    import numpy as np
    from PIL import Image

    ckpt, cfg_dir = tiny_sd15
    images = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    rows = ["filename,prompt"]
    for i, (w, h) in enumerate([(128, 128), (192, 128), (128, 192), (128, 128)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        rows.append(f'img{i}.png,"neon city, rain, view {i}"')
    (images / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("run") / "cyberpunk_night"
    cfg = sd_args(ckpt, cfg_dir, images, out, text_encoder_lr=5e-4, sample_prompts="['neon city', 'rain']",
                  sample_steps=2)
    return cfg, train_sd(cfg, progress=False)


def unet_and_te_outputs(pipe, seed=0):
    """UNet and text-encoder outputs on the pipeline's device (a trained one is on the GPU where there is
    one), returned on the CPU."""
    dev = pipe.unet.device
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=g).to(dev)
    ids = pipe.tokenizer(["a neon city in the rain"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.to(dev))[0]
        out = pipe.unet(latents, torch.tensor([500], device=dev), hidden).sample
    return out.cpu(), hidden.cpu()


def test_run_writes_every_output(trained):
    cfg, result = trained
    out = result.output_dir
    assert result.steps == 4  # 4 images x 1 repeat / batch 2 = 2 steps per epoch, 2 epochs
    for name in ["cyberpunk_night.safetensors", "pytorch_lora_weights.safetensors", "config.yaml", "events.jsonl",
                 "loss_curve.png", "samples/step_000002.png", "samples/step_000004.png", "checkpoint-000004"]:
        assert (out / name).exists(), name
    start = next(e for e in result.events if e["event"] == "start")
    # at 128 px the 64-px grid is coarse: 3:2 and 2:3 images are nearest the square bucket
    assert start["buckets"] == {"128x128": 4}
    assert (out / "checkpoint-000004" / "cyberpunk_night.safetensors").exists()  # checkpoints are usable LoRAs


def test_kohya_file_keys_alpha_and_metadata(trained):
    cfg, result = trained
    with safe_open(str(result.lora_file), "pt") as fh:
        keys, md = set(fh.keys()), fh.metadata()
        alphas = {k: fh.get_tensor(k) for k in keys if k.endswith(".alpha")}
    unet_keys = {k for k in keys if k.startswith("lora_unet_")}
    te_keys = {k for k in keys if k.startswith("lora_te_")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in unet_keys
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in unet_keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha" in te_keys
    assert keys == unet_keys | te_keys
    assert {float(a) for a in alphas.values()} == {12.0}  # the real alpha, not alpha = rank
    assert md["ss_output_name"] == "cyberpunk_night" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "12.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_module"] == "networks.lora"
    assert json.loads(md["ss_tag_frequency"])[str(cfg.train_data_dir)]["neon city"] == 4
    data = result.lora_file.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()


def test_exports_reload_in_diffusers_and_match_the_trained_model(trained, tiny_sd15):
    cfg, result = trained
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    ckpt, cfg_dir = tiny_sd15
    base_unet, _ = unet_and_te_outputs(load_sd(str(ckpt), "sd15", cfg_dir).pipe)
    assert float((base_unet - expected_unet).abs().max()) > 1e-4  # training changed the model
    for file in [result.lora_file, result.diffusers_file]:
        pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        unet_out, te_out = unet_and_te_outputs(pipe)
        assert float((unet_out - expected_unet).abs().max()) <= 1e-5, file.name
        assert float((te_out - expected_te).abs().max()) <= 1e-5, file.name


def a1111_apply(pipe, lora_file, multiplier=1.0):
    """The WebUI's formula, written independently: W += up @ down * alpha / rank * multiplier."""
    tensors = load_file(str(lora_file))
    targets = {}
    for prefix, root in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, mod in root.named_modules():
            path = name if prefix == "lora_unet_" else f"text_model.{name}"
            targets[prefix + path.replace(".", "_")] = mod
    applied = 0
    with torch.no_grad():
        for key in {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}:
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            alpha = float(tensors[f"{key}.alpha"])
            weight = targets[key].weight
            # linear: (out, r) @ (r, in); conv (LoCon): (out, r, 1, 1) and (r, in, k, k) flattened
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += delta * alpha / down.shape[0] * multiplier
            applied += 1
    return applied


def test_a1111_formula_gives_the_same_model(trained, tiny_sd15):
    cfg, result = trained
    ckpt, cfg_dir = tiny_sd15
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    # UNet: 6 transformer blocks (2 down, 1 mid, 3 up) x 2 attentions x 4 projections; TE: 2 layers x 4
    assert a1111_apply(pipe, result.lora_file) == 6 * 2 * 4 + 2 * 4
    unet_out, te_out = unet_and_te_outputs(pipe)
    assert float((unet_out - expected_unet).abs().max()) <= 1e-4
    assert float((te_out - expected_te).abs().max()) <= 1e-4


def test_resume_continues_the_step_count_and_matches(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    kw = dict(epochs=3, save_steps=2, sample_every_n_epochs="null", flip_aug="true", shuffle_caption="true")
    full = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "full", **kw), progress=False)

    class Stop(Exception):
        pass

    def stop_at_5(event):
        if event["event"] == "step" and event["step"] == 5:
            raise Stop

    with pytest.raises(Stop):
        train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "cut", **kw), callback=stop_at_5, progress=False)
    resumed = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "cut", resume_from="latest", **kw),
                       progress=False)
    steps = [e["step"] for e in resumed.events if e["event"] == "step"]
    assert steps[0] == 5 and steps[-1] == full.steps == 12  # buckets of 5 and 1 views, batch 2: 3 + 1 steps per epoch
    a, b = load_file(full.lora_file), load_file(resumed.lora_file)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_latent_cache_is_reused_and_corruption_is_rebuilt(tiny_sd15, style_images, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    ckpt, cfg_dir = tiny_sd15
    args = dict(epochs=1, sample_every_n_epochs="null", max_train_steps=1)
    first = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "a", **args), progress=False)
    msg = next(e["message"] for e in first.events if "latent cache" in e.get("message", ""))
    assert "0 reused, 6 encoded" in msg
    files = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 6
    raw = bytearray(files[0].read_bytes())
    raw[-3] ^= 0xFF  # flip a byte inside the tensor data
    files[0].write_bytes(bytes(raw))
    second = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "b", **args), progress=False)
    msg = next(e["message"] for e in second.events if "latent cache" in e.get("message", ""))
    assert "5 reused, 1 encoded" in msg


def test_buckets_keep_the_area_and_crop_little():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (576, 448) in buckets and (448, 576) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    from PIL import Image

    img = sd_data.fit_to_bucket(Image.new("RGB", (1920, 1080)), (640, 384))
    assert img.size == (640, 384)  # 1920x1080 scales to 682x384: 42 px (6%) cropped from the width


def test_min_snr_weights():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w = snr_weights(s, t, 5.0, "epsilon")
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert float(w[0]) < 0.01 and float(w[2]) == pytest.approx(1.0)


def test_v_prediction_noise_offset_and_min_snr_train(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "v", v_parameterization="true",
                              min_snr_gamma=5, noise_offset=0.05, max_train_steps=2, sample_every_n_epochs="null"),
                      progress=False)
    start = next(e for e in result.events if e["event"] == "start")
    assert start["prediction_type"] == "v_prediction" and result.final_loss is not None


def test_locon_conv_layers_export_and_reload(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    # in bf16: the frozen conv layers train in bf16 and come back as the exact fp32 ones for the comparison
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "locon", train_unet_conv="true",
                              max_train_steps=2, sample_every_n_epochs="null", mixed_precision="bf16"), progress=False)
    assert result.reload_unet is not None
    keys = load_file(result.lora_file).keys()
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in keys
    expected, _ = unet_and_te_outputs(result.model.pipe)
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    pipe.load_lora_weights(str(result.lora_file.parent), weight_name=result.lora_file.name)
    assert float((unet_and_te_outputs(pipe)[0] - expected).abs().max()) <= 1e-5
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    a1111_apply(pipe, result.lora_file)
    assert float((unet_and_te_outputs(pipe)[0] - expected).abs().max()) <= 1e-4


def test_dora_export_writes_dora_scale_per_output_row(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "dora", lora_type="dora", max_train_steps=1,
                              sample_every_n_epochs="null", mixed_precision="bf16"), progress=False)
    assert result.reload_unet is None  # DoRA reads the base weights' norms: they stay fp32
    tensors = load_file(result.lora_file)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up = tensors[f"{key}.lora_up.weight"]
    assert tensors[f"{key}.dora_scale"].shape == (up.shape[0], 1)


def test_rslora_export_alpha_metadata_a1111_and_diffusers_agree(tiny_sd15, style_images, tmp_path):
    """rsLoRA scales by alpha / sqrt(rank): the file carries the alpha that readers (alpha / rank) turn into
    that scale, ss_network_alpha says the same number, and A1111's formula and diffusers rebuild the model."""
    from safetensors import safe_open

    from lora_scripts.export.scale import file_alpha, lora_scale

    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "rs", lora_type="rslora", lora_rank=4,
                              lora_alpha=6, text_encoder_lr=1e-3, max_train_steps=2, sample_every_n_epochs="null"),
                      progress=False)
    assert lora_scale(6, 4, rslora=True) == 3.0 and file_alpha(6, 4, rslora=True) == 12.0  # 6 / sqrt(4), over r
    tensors = load_file(result.lora_file)
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    with safe_open(str(result.lora_file), "pt") as fh:
        assert alphas == {12.0} and float(fh.metadata()["ss_network_alpha"]) == 12.0
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    a1111_apply(pipe, result.lora_file)
    unet_out, te_out = unet_and_te_outputs(pipe)
    assert float((unet_out - expected_unet).abs().max()) <= 1e-4 and float((te_out - expected_te).abs().max()) <= 1e-4
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    pipe.load_lora_weights(str(result.lora_file.parent), weight_name=result.lora_file.name)
    assert float((unet_and_te_outputs(pipe)[0] - expected_unet).abs().max()) <= 1e-5


def test_all_linear_is_kohyas_default_network_and_loads_everywhere(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "all", target_modules="all-linear",
                              text_encoder_lr=5e-4, max_train_steps=2, sample_every_n_epochs="null"), progress=False)
    keys = set(load_file(result.lora_file))
    block = "lora_unet_down_blocks_0_attentions_0"
    for module in ["proj_in", "proj_out", "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2",
                   "transformer_blocks_0_attn2_to_k"]:
        assert f"{block}_{module}.lora_down.weight" in keys, module
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys
    assert not any("time_emb_proj" in k or "resnets" in k for k in keys)  # outside the transformer blocks
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    # 6 transformer blocks x (2 attentions x 4 + 2 feed-forward + proj_in/out, 1x1 convs in SD1.5); TE: 2 x 6
    assert a1111_apply(pipe, result.lora_file) == 6 * 12 + 2 * 6
    for loaded in [pipe, load_sd(str(ckpt), "sd15", cfg_dir).pipe]:
        if loaded is not pipe:
            loaded.load_lora_weights(str(result.diffusers_file.parent), weight_name=result.diffusers_file.name)
        unet_out, te_out = unet_and_te_outputs(loaded)
        assert float((unet_out - expected_unet).abs().max()) <= 1e-4
        assert float((te_out - expected_te).abs().max()) <= 1e-4


def test_every_image_is_seen_each_epoch_when_buckets_do_not_fill_batches(tiny_sd15, tmp_path):
    import numpy as np
    from PIL import Image

    ckpt, cfg_dir = tiny_sd15
    images = tmp_path / "uneven"
    images.mkdir()
    rng = np.random.default_rng(2)
    rows = ["filename,prompt"]
    for i, (w, h) in enumerate([(128, 128)] * 3 + [(256, 96)] * 3):  # 3 square + 3 wide: 3 views per bucket
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"i{i}.png")
        rows.append(f"i{i}.png,view {i}")
    (images / "metadata.csv").write_text("\n".join(rows) + "\n")
    cfg = sd_args(ckpt, cfg_dir, images, tmp_path / "run", epochs=2, save_steps=100, sample_every_n_epochs="null")
    from lora_scripts.preflight import run_preflight

    report = run_preflight(cfg)
    assert has_message(report, "4 optimizer steps per epoch, 8 in all over 2 epoch(s)")  # 2 + 2, not ceil(6/2)
    result = train_sd(cfg, progress=False)
    steps = [e for e in result.events if e["event"] == "step"]
    start = next(e for e in result.events if e["event"] == "start")
    assert len(start["buckets"]) == 2 and len(steps) == result.steps == 8
    assert [sum(e["images"] for e in steps[:4]), sum(e["images"] for e in steps[4:])] == [6, 6]


def has_message(report, text):
    return any(text in f.message for f in report.findings)


def test_held_out_eval_loss_best_epoch_and_save_best(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    out = tmp_path / "evald"
    # val_ratio 0.34 of 6 images holds out 2; the 4 left (buckets of 3 and 1 views) make 3 steps per epoch
    cfg = sd_args(ckpt, cfg_dir, style_images, out, epochs=3, val_ratio=0.34, save_best="true", save_steps=3,
                  save_total_limit="null", sample_every_n_epochs="null", learning_rate=3e-3)
    result = train_sd(cfg, progress=False)
    evals = [(e["step"], e["eval_loss"]) for e in result.events if e["event"] == "eval"]
    assert [s for s, _ in evals] == [0, 3, 6, 9] and result.eval_losses == evals
    assert all(0 < v < 10 for _, v in evals)
    end = next(e for e in result.events if e["event"] == "end")
    best_step, best_loss = min(evals[1:], key=lambda e: e[1])  # the base model (step 0) is never "best"
    assert (end["best_step"], end["best_epoch"], end["best_eval_loss"]) == (best_step, best_step // 3, best_loss)
    best = load_file(out / "evald-best.safetensors")
    at_best = load_file(out / f"checkpoint-{best_step:06d}" / "evald.safetensors")
    assert best.keys() == at_best.keys() and all(best[k].equal(at_best[k]) for k in best)

    # fixed noise and timesteps: a model that does not change gives the same eval loss every epoch
    still = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "still", epochs=2, val_ratio=0.34,
                             learning_rate=1e-12, sample_every_n_epochs="null"), progress=False)
    values = [v for _, v in still.eval_losses]
    assert len(values) == 3 and max(values) - min(values) <= 1e-6 * values[0], values


def test_image_eval_data_is_checked_by_the_preflight(tiny_sd15, style_images, tmp_path):
    from lora_scripts.preflight import run_preflight

    ckpt, cfg_dir = tiny_sd15
    report = run_preflight(sd_args(ckpt, cfg_dir, style_images, tmp_path / "a", val_ratio=0.34))
    assert has_message(report, "val_ratio 0.34: 2 of 6 images held out for the eval loss")
    assert has_message(report, "3 optimizer steps per epoch")  # the 4 images left train
    report = run_preflight(sd_args(ckpt, cfg_dir, style_images, tmp_path / "b", eval_data_path=style_images))
    assert has_message(report, f"eval_data_path {style_images}: 6 held-out images")
    report = run_preflight(sd_args(ckpt, cfg_dir, style_images, tmp_path / "c", save_best="true"))
    assert report.errors == ["save_best needs an eval loss to pick the best epoch: set val_ratio (e.g. 0.1) or "
                             "eval_data_path"]
