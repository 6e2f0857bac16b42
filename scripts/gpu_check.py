"""The parts of scripts/gpu_check.sh, each in a fresh process with a time limit; one JSON of all results.

`python scripts/gpu_check.py OUT_DIR` runs every part; `--part NAME OUT_DIR` runs one and prints its result
as the last line (JSON). A part that fails or runs out of time is recorded as such and the next one runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# part: seconds it may take (the whole check stays under ~8 minutes on a modern GPU)
PARTS = {"environment": 60, "sd_memory": 420, "tests": 240, "llm_demo_auto": 120, "llm_demo_fp16": 120,
         "sd_fp16": 150, "sd_bf16": 150, "bench_gpu": 240}
SD_STEPS = 30
MAX_SKIPPED = 5  # more skipped fp16 updates in 30 steps than loss scaling's first few is a storm
# GPU_CHECK_DRY=1: the same plumbing, small, on whatever device there is (checks this script without a GPU)
DRY = os.environ.get("GPU_CHECK_DRY") == "1"


def environment(out: Path) -> dict:
    import torch

    from lora_scripts.hardware import choose_precision

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    chosen = choose_precision("auto")
    info.update(auto_precision=chosen.label, reason=chosen.reason, ok=torch.cuda.is_available() or DRY)
    return info


def tests(out: Path) -> dict:
    which = ["tests/test_precision.py"] if DRY else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *which], cwd=REPO,
                          capture_output=True, text=True)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    summary = next((ln for ln in reversed(proc.stdout.splitlines()) if " passed" in ln or " failed" in ln), "")
    return {"ok": proc.returncode == 0, "summary": summary.strip("= ")}


def llm_demo(out: Path, precision: str) -> dict:
    from lora_scripts.models.embedded import is_prepared, model_dir

    if not is_prepared(model_dir("smollm2-135m-instruct")):
        return {"ok": None, "skipped": "the embedded model is not prepared here (./setup.sh; needs PyPI)"}
    run_dir = out / f"demo_{precision}"
    if DRY:  # a CPU has no fp16 training (the preflight refuses it): the plumbing alone, small
        precision = "no" if precision == "fp16" else precision
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_scripts.cli", "demo", f"output_dir={run_dir}",
                           f"mixed_precision={precision}", "save_steps=1000",
                           *(["max_train_steps=2", "max_new_tokens=4"] if DRY else [])],
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / f"demo_{precision}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "seconds": round(seconds, 1), "error": proc.stderr[-1500:]}
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "end")
    # the README's bars (a dry run trains 2 steps: only that it runs through is judged)
    ok = DRY or (summary["eval_loss_drop"] >= 0.30 and summary["style_score_tuned"] >= 0.8
                 and summary["stopped_tuned"] >= 0.9 and end["skipped_steps"] <= MAX_SKIPPED)
    return {"ok": ok, "seconds": round(seconds, 1), "precision": end["precision"],
            "skipped_steps": end["skipped_steps"], **summary}


def write_images(folder: Path, n: int = 8) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filename,prompt"]
    for i in range(n):
        grad = np.linspace(0, 255, 512, dtype=np.float32)
        img = np.stack([np.add.outer(grad, grad) / 2, np.outer(np.ones(512), grad), rng.uniform(0, 255, (512, 512))],
                       axis=-1).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,\"a test pattern, number {i}\"")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def sd_run(out: Path, precision: str) -> dict:
    """SD1.5's full architecture (random weights), 512 px, batch 4, 30 steps; then the files load in diffusers."""
    sys.path.insert(0, str(REPO / "bench"))
    import diffusers
    import torch
    from sd_bench import build_full_sd15

    from lora_scripts.config_file import load_config
    from lora_scripts.train.sd import train_sd

    work = Path(os.environ.get("GPU_CHECK_WORK", tempfile.gettempdir())) / "lora-scripts-gpu-check"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if DRY:
        from lora_scripts.models.sd import build_tiny_sd

        model = work / "sd15-tiny"
        if not (model / "model_index.json").exists():
            build_tiny_sd("sd15").save_pretrained(model)
    else:
        model = build_full_sd15(work / "sd15-full")
    data = write_images(work / "images")
    run_dir = work / f"sd_{precision}"
    cfg = load_config(None, [f"base_model={model}", "model_type=sd15", f"train_data_dir={data}", f"output_dir={run_dir}",
                             f"resolution={64 if DRY else 512}", "batch_size=4",
                             f"max_train_steps={2 if DRY else SD_STEPS}", "repeats=10",
                             f"mixed_precision={precision}", "learning_rate=1e-4", "save_steps=100000",
                             "sample_every_n_epochs=null", "save_precision=fp16", "resume_from=null"])
    t0 = time.perf_counter()
    result = train_sd(cfg, progress=False)
    seconds = time.perf_counter() - t0
    steps = [e for e in result.events if e["event"] == "step"]
    losses = [e["loss"] for e in steps]
    finite = all(math.isfinite(v) for v in losses)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.to(device, torch.float16 if device == "cuda" else torch.float32)
    loaded = {}
    for name, path in (("diffusers", result.diffusers_file), ("kohya", result.lora_file)):
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        loaded[name] = sum("lora" in n for n, _ in pipe.unet.named_parameters())
    return {"ok": finite and result.skipped_steps <= MAX_SKIPPED and all(loaded.values()),
            "precision": precision, "steps": len(steps), "seconds": round(seconds, 1),
            "step_seconds_median": sorted(e["seconds"] for e in steps)[len(steps) // 2],
            "images_per_s_median": sorted(e["images_per_s"] for e in steps)[len(steps) // 2],
            "first_loss": losses[0], "last_loss": losses[-1], "finite": finite,
            "skipped_steps": result.skipped_steps, "loss_scale_last": steps[-1].get("loss_scale"),
            "lora_parameters_loaded": loaded,
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}


def build_full(model_type: str, folder: Path) -> Path:
    """SD1.5's or SDXL's full architecture with random weights (fp16 files), from the shipped configs."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_scripts.models.sd_configs import config_folder

    if (folder / "model_index.json").exists():
        return folder
    src = config_folder(model_type)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        unet = diffusers.UNet2DConditionModel.from_config(json.loads((src / "unet/config.json").read_text()))
        vae = diffusers.AutoencoderKL.from_config(json.loads((src / "vae/config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(src / "text_encoder_2")) \
            if model_type == "sdxl" else None
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(src / "scheduler")
    tok = CLIPTokenizer.from_pretrained(src / "tokenizer")
    if model_type == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                                   tokenizer_2=CLIPTokenizer.from_pretrained(src / "tokenizer_2"),
                                                   unet=unet, scheduler=sched)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    return folder


def sd_memory(out: Path) -> dict:
    """Peak GPU memory of SD1.5 at 512 px batch 4 and SDXL at 1024 px batch 1 (full architectures, random
    weights, bf16/fp16 as auto picks, 4 steps), with the VAE and frozen text encoders parked in RAM after
    caching (the default) and kept on the GPU; and the preflight's estimate beside each."""
    import torch

    import lora_scripts.train.sd_caches as caches
    from lora_scripts.config_file import load_config
    from lora_scripts.hardware import choose_precision
    from lora_scripts.memory import estimate_sd_memory
    from lora_scripts.train.sd import train_sd

    work = Path(os.environ.get("GPU_CHECK_WORK", tempfile.gettempdir())) / "lora-scripts-gpu-check"
    cases = [("sd15", 64 if DRY else 512, 4), ("sdxl", 64 if DRY else 1024, 1)]
    results, park = {}, caches.park
    for model_type, size, batch in cases:
        if DRY:
            from lora_scripts.models.sd import build_tiny_sd

            model = work / f"{model_type}-tiny"
            if not (model / "model_index.json").exists():
                build_tiny_sd(model_type).save_pretrained(model)
        else:
            model = build_full(model_type, work / f"{model_type}-full")
        data = write_images(work / "images")
        precision = choose_precision("auto")
        keys = [f"base_model={model}", f"model_type={model_type}", f"train_data_dir={data}", f"resolution={size}",
                f"batch_size={batch}", "max_train_steps=4", "repeats=4", "save_steps=100000", "resume_from=null",
                "sample_every_n_epochs=null", "sample_prompts=[]"]
        est = estimate_sd_memory(load_config(None, keys), model_type, precision.device, precision.name, (size, size), 8)
        row = {"estimate_gb": round(est.total() / 2**30, 2), "precision": precision.label}
        for parked in (True, False):
            caches.park = park if parked else (lambda parts, device: None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            cfg = load_config(None, [*keys, f"output_dir={work / f'mem_{model_type}_{parked}'}"])
            peaks = {}

            def at_start(event, peaks=peaks):  # the caches are built: from here on, the steps' peak
                if event["event"] == "start" and torch.cuda.is_available():
                    peaks["caching"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()

            train_sd(cfg, callback=at_start, progress=False)
            if torch.cuda.is_available():
                tag = "parked" if parked else "resident"
                row[f"steps_peak_gb_{tag}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                row[f"caching_peak_gb_{tag}"] = round(peaks["caching"] / 2**30, 2)
        caches.park = park
        results[f"{model_type}_{size}px_batch{batch}"] = row
    return {"ok": True, **results}


def bench_gpu(out: Path) -> dict:
    if DRY:
        return {"ok": None, "skipped": "dry run"}
    env = {**os.environ, "BENCH_PROFILE": "gpu"}
    proc = subprocess.run([sys.executable, "bench/run.py"], cwd=REPO, capture_output=True, text=True, env=env)
    (out / "bench_gpu.log").write_text(proc.stdout + proc.stderr)
    result = {"ok": proc.returncode == 0, "table": proc.stdout[-3000:]}
    latest = REPO / "bench" / "results" / "latest-gpu.json"
    if latest.exists():
        result["results"] = json.loads(latest.read_text())
    return result


def run_part(name: str, out: Path) -> dict:
    return {"environment": environment, "tests": tests, "llm_demo_auto": lambda o: llm_demo(o, "auto"),
            "llm_demo_fp16": lambda o: llm_demo(o, "fp16"), "sd_fp16": lambda o: sd_run(o, "fp16"),
            "sd_bf16": lambda o: sd_run(o, "bf16"), "sd_memory": sd_memory, "bench_gpu": bench_gpu}[name](out)


def main() -> int:
    if sys.argv[1] == "--part":
        print(json.dumps(run_part(sys.argv[2], Path(sys.argv[3])), default=str))
        return 0
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results, start = {}, time.perf_counter()
    for name, limit in PARTS.items():
        t0 = time.perf_counter()
        print(f"== {name} (at most {limit} s)", flush=True)
        # its own process group, so a part out of time is stopped with every process it started
        proc = subprocess.Popen([sys.executable, __file__, "--part", name, str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            lines = stdout.strip().splitlines()
            result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "ok": False, "error": (stderr or stdout)[-2000:]}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            result = {"ok": False, "error": f"ran past its {limit} s"}
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        print(json.dumps(result, indent=2, default=str)[:3000], flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    failed = [n for n, r in results.items() if r.get("ok") is False]
    print(f"gpu check: {len(results) - len(failed)} of {len(results)} parts passed or skipped"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f" ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
