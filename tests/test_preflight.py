"""The preflight: each kind of bad input gets its own precise message, before any model is loaded."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import write_description_config
from lora_scripts.config import ConfigError
from lora_scripts.config_file import load_config
from lora_scripts.data import images as imgdata
from lora_scripts.hardware import device_type
from lora_scripts.preflight import run_preflight
from lora_scripts.train import train


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    save(rgb, d / "good.png")
    save(rgb.convert("CMYK"), d / "cmyk.jpg")
    save(Image.fromarray((rng.integers(0, 65535, (64, 64))).astype(np.uint16)), d / "deep16.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    save(rgba, d / "alpha.png")
    save(rgb.convert("L"), d / "gray.png")
    save(Image.new("RGB", (1, 4000)), d / "sliver.png")
    (d / "zero.jpg").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    save(rgb, d / "nocaption.png")
    save(rgb, d / "sidecar.png")
    (d / "sidecar.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    rows = ["filename,prompt", "good.png,\"a photo, with commas\"", "cmyk.jpg,print", "deep16.png,deep",
            "alpha.png,alpha", "gray.png,gray", "sliver.png,thin", "zero.jpg,z", "garbage.jpg,g",
            "truncated.jpg,t", "ghost.png,an image that does not exist", "good.png,duplicate row", "empty.png,"]
    (d / "metadata.csv").write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode())
    return d


def findings(tmp_path, **kw):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    args = {"base_model": str(model), "output_dir": str(tmp_path / "out"), "resolution": 64, **kw}
    report = run_preflight(load_config(None, [f"{k}={v}" for k, v in args.items()]))
    return report, {f.message for f in report.findings}


def has(messages, *parts):
    return any(all(p in m for p in parts) for m in messages)


def test_every_bad_image_and_caption_is_reported(tmp_path, image_dir):
    report, msgs = findings(tmp_path, train_data_dir=image_dir)
    assert not report.ok and report.model_type == "sd15"
    errors = set(report.errors)
    assert has(errors, "zero.jpg: zero-byte file")
    assert has(errors, "garbage.jpg: not an image")
    assert has(errors, "truncated.jpg: corrupt or truncated")
    assert has(errors, "sliver.png: 1x4000 has aspect ratio 4000:1")
    assert has(errors, "ghost.png is listed but there is no such image")
    assert has(errors, "nocaption.png: no caption")
    assert has(errors, "sidecar.txt: not UTF-8 text")
    assert has(errors, "metadata.csv:13: empty.png has an empty caption")
    warnings = {f.message for f in report.findings if f.level == "warning"}
    assert has(warnings, "metadata.csv:12: good.png is listed twice")
    assert has(warnings, "cmyk.jpg: CMYK, converted to RGB")
    assert has(warnings, "deep16.png: 16-bit, converted to 8-bit")
    assert has(warnings, "alpha.png: has transparency, flattened on white")
    assert has(warnings, "gray.png: grayscale, converted to RGB")
    assert not has(msgs, "good.png: ")  # the good image (with a quoted comma caption) raises nothing


def test_conversions_open_as_rgb(image_dir):
    for name in ["cmyk.jpg", "deep16.png", "alpha.png", "gray.png"]:
        img = imgdata.open_rgb(image_dir / name)
        assert img.mode == "RGB"
    # fully transparent pixels are flattened on white
    assert imgdata.open_rgb(image_dir / "alpha.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert imgdata.open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_repeat_folders(tmp_path):
    (tmp_path / "10_style").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "10_style" / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    items = {it.key: it.repeats for it in imgdata.scan_images(tmp_path)}
    assert items == {"10_style/a.png": 10, "b.png": 1}


def test_missing_paths_and_contradictions(tmp_path):
    report, _ = findings(tmp_path, train_data_dir=tmp_path / "nope")
    assert has(report.errors, "nope: not a folder")
    report, _ = findings(tmp_path, base_model=tmp_path / "missing.safetensors", train_data_dir=tmp_path)
    assert has(report.errors, "missing.safetensors: no such file or folder")
    report, messages = findings(tmp_path, mixed_precision="fp16", train_data_dir=tmp_path)
    if device_type() == "cpu":  # a CPU-only rule: on a GPU fp16 is allowed, and said so
        assert has(report.errors, "fp16 needs a CUDA GPU")
    else:
        assert not has(report.errors, "fp16") and has(messages, "precision: fp16 on cuda")


def test_llm_plan_warnings(tmp_path, pairs_csv, tiny_llama):
    base = {"base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": tmp_path / "o", "batch_size": 4}
    report = run_preflight(load_config(None, [f"{k}={v}" for k, v in {**base, "epochs": 2, "save_steps": 500}.items()]))
    msgs = [f.message for f in report.findings]
    assert report.ok and report.model_type == "llm"
    assert has(msgs, "6 optimizer steps per epoch, 12 in all over 2 epoch(s)")
    assert has(msgs, "save_steps=500 is larger than the 12 total steps")
    assert has(msgs, "24 training samples is below the 50-200 sweet spot")
    report = run_preflight(load_config(None, [f"{k}={v}" for k, v in {**base, "epochs": 1, "warmup_steps": 6}.items()]))
    assert has(report.errors, "warmup of 6 steps is not shorter than the 6 training steps")


def test_a_key_the_family_does_not_read_is_refused_whether_model_type_is_written_or_sniffed(
        tmp_path, pairs_csv, tiny_llama):
    base = {"base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": tmp_path / "o"}
    for written in ({}, {"model_type": "llm"}):
        cfg = load_config(None, [f"{k}={v}" for k, v in {**base, **written, "noise_offset": 0.05,
                                                          "text_encoder_lr": 1e-5, "resolution": 512}.items()])
        report = run_preflight(cfg)
        assert report.errors == [
            "noise_offset: 0.05 applies to image models (Stable Diffusion); this is an LLM run. Remove it",
            "text_encoder_lr: 1e-05 applies to image models (Stable Diffusion); an LLM has no text encoder of its "
            "own to train. Remove it"], written  # resolution: 512 is the default, so nothing is lost
        with pytest.raises(ConfigError, match="noise_offset: 0.05 applies to image models"):
            train(cfg)  # a library caller that skips the preflight hears it too, before any model loads


def test_the_descriptions_example_config_uses_every_key(tmp_path, tiny_sd15, style_images):
    ckpt, cfg_dir = tiny_sd15
    out = tmp_path / "output" / "my_style_lora"
    cfg = write_description_config(tmp_path / "my_lora_config.yaml", style_images, ckpt, out)
    report = run_preflight(load_config(cfg))
    messages = [f.message for f in report.findings]
    assert report.model_type == "sd15" and "config: the 13 key(s) set are all used by this sd15 run" in messages
    report = run_preflight(load_config(cfg, ["max_seq_length=256"]))
    assert report.errors == ["max_seq_length: 256 applies to LLM runs; this is an image run (sd15). Remove it"]


def test_unreadable_output_dir(tmp_path, pairs_csv, tiny_llama):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    report = run_preflight(load_config(None, [f"base_model={tiny_llama}", f"metadata_path={pairs_csv}",
                                              f"output_dir={blocker / 'sub'}"]))
    assert has(report.errors, "cannot write there")


def test_time_estimate_follows_the_length_of_the_samples(tmp_path, tiny_llama):
    """The estimate counts the data's own tokens (packed: no padding), not a fixed length per sample."""
    import re

    from conftest import write_pairs_csv

    def estimate_seconds(reply_words: int) -> float:
        pairs = [(f"question {i}?", " ".join(["word"] * reply_words)) for i in range(60)]
        data = write_pairs_csv(tmp_path / f"pairs{reply_words}.csv", pairs)
        cfg = load_config(None, [f"base_model={tiny_llama}", f"metadata_path={data}",
                                 f"output_dir={tmp_path / 'out'}", "epochs=2"])
        report = run_preflight(cfg)
        assert any(re.match(r"rough estimate on \w+ in \w+ \(matmuls measured at [\d,]+ GFLOP/s\): \d+ (s|min) of "
                            r"training steps", f.message) for f in report.findings)
        return report.estimated_seconds

    short, long = estimate_seconds(10), estimate_seconds(200)
    # 4 characters per token, plus ~35 for the chat template's headers: ~15 + 35 vs ~250 + 35 tokens a sample
    assert 5 < long / short < 10, (short, long)


def test_the_precision_chosen_is_printed_and_an_emulated_bf16_is_warned(tmp_path, pairs_csv, tiny_llama):
    from lora_scripts.hardware import choose_precision, cpu_has_bf16_units

    base = [f"base_model={tiny_llama}", f"metadata_path={pairs_csv}", f"output_dir={tmp_path / 'o'}"]
    auto = run_preflight(load_config(None, base))
    chosen = choose_precision("auto")
    assert has([f.message for f in auto.findings], f"precision: {chosen.label} on {chosen.device} ({chosen.reason})")
    bf16 = run_preflight(load_config(None, [*base, "mixed_precision=bf16"]))
    warnings = [f.message for f in bf16.findings if f.level == "warning"]
    if chosen.device == "cpu" and not cpu_has_bf16_units():
        assert has(warnings, "bf16 on a CPU without bf16 units") and has(warnings, "~45x slower than fp32")
        assert "rough estimate on cpu in bf16" in " ".join(f.message for f in bf16.findings)
        assert bf16.estimated_seconds > 10 * auto.estimated_seconds  # measured: emulated bf16 is far slower
    else:
        assert not has(warnings, "bf16")


def test_the_preflight_and_the_config_load_no_ml_library():
    """`validate` must answer before any ML library loads: importing it pulls in none of them."""
    import subprocess
    import sys

    code = ("import sys, lora_scripts.preflight, lora_scripts.config, lora_scripts.memory; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'peft', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_validate_runs_without_torch_once_this_cpu_speed_is_known(tmp_path, pairs_csv, tiny_llama):
    """The first preflight on a CPU measures its matmul speed (torch loads); later ones read it from the
    cache and load no ML library at all: `validate` answers in well under 2 s."""
    import os
    import subprocess
    import sys

    from lora_scripts.hardware import GPU_DEVICE_FILES

    code = (f"import sys; from lora_scripts.config_file import load_config; from lora_scripts.preflight import run_preflight; "
            f"r = run_preflight(load_config(None, ['base_model={tiny_llama}', 'metadata_path={pairs_csv}', "
            f"'output_dir={tmp_path / 'o'}'])); assert r.ok and r.estimated_seconds > 0, r.render(); "
            f"print('torch' in sys.modules)")
    env = {**os.environ, "LORA_SCRIPTS_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert runs[0].stdout.strip() == "True"  # measured
    gpu_possible = any(os.path.exists(f) for f in GPU_DEVICE_FILES) or not sys.platform.startswith("linux")
    assert runs[1].stdout.strip() == ("True" if gpu_possible else "False")  # a GPU machine asks torch for it
    assert (tmp_path / "cache" / "speed.json").exists()


def test_bf16_units_read_from_the_kernel_agree_with_torchs_probes():
    import torch

    from lora_scripts.hardware import cpu_has_bf16_units

    assert cpu_has_bf16_units() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
