"""`make bench`: ours against what users would run instead, side by side in one invocation.

LLM: our trainer vs transformers Trainer + PEFT (SmolLM2-135M-Instruct, LoRA r=8 q/k/v/o, batch 4, bf16),
on the demo dataset and on a length-varied one. SD: our trainer (cached latents and text embeddings) vs a
loop written like diffusers' train_text_to_image_lora.py, on a mid-size SD1.5-architecture model.
Runs alternate A B A B in fresh processes; the table shows medians and ratios (ours / baseline), and
bench/results/latest.json + latest.png keep them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_scripts.hardware import cpu_has_bf16_units, cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_data import write_long, write_photo_sized, write_varied  # noqa: E402

# SmolLM2-135M: 30 layers x (q,o 576x576; k,v 576x192; gate/up/down 576x1536): weights in matmuls
SMOL_BODY_PARAMS = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


# What each profile trains. "cpu": sized for a 2-core machine. "gpu": what the issue asks of a GPU run
# (SmolLM2 at seq 512 batch 8; SD1.5's full UNet, random weights, 512 px, batch 4). "cpu-sd15": SD only, SD1.5's
# full-size architecture at 256 px on the CPU (~4 minutes): the mid-size model shrinks the VAE and text encoder,
# which only the baseline runs at every step, as much as the UNet, so it cannot show their real share of a step.
PROFILES = {
    "cpu": {"llm_batch": 4, "llm_seq": 512, "llm_data": ("demo", "varied"), "sd": "mid", "sd_resolution": 256,
            "sd_sources": ("small", "photo")},
    "gpu": {"llm_batch": 8, "llm_seq": 512, "llm_data": ("demo", "long"), "sd": "full", "sd_resolution": 512,
            "sd_sources": ("small", "photo")},
    "cpu-sd15": {"llm_data": (), "sd": "full", "sd_resolution": 256, "sd_sources": ("small",)},
}
SD_MODELS = {"mid": "SD1.5's architecture at a quarter of every width (UNet, VAE, text encoder)",
             "full": "SD1.5's full-size architecture (UNet 860M, VAE, CLIP-L)"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak(dtype: torch.dtype, reps: int = 10) -> float:
    n = 8192 if DEVICE == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    for _ in range(2):
        a @ b
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run(script: str, *args: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{script} {args[0]} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(line[len("RESULT "):]), "process_seconds": time.perf_counter() - t0}


def median(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))  # models, data and outputs of the runs: ~350 MB
    try:
        return bench(work)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"the runs' folders are kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path) -> int:
    # 10 steps, the first 2 not timed: 8 timed steps a run keeps the whole bench under 10 minutes in slow spells
    steps_llm, steps_sd = int(os.environ.get("BENCH_LLM_STEPS", 10)), int(os.environ.get("BENCH_SD_STEPS", 10))
    # LLM: A B A B A B, medians of 3 against this machine's ±15% drift; SD: A B A B, which keeps the whole
    # bench under 10 minutes (an SD run is ~20 s, two thirds of it process start and model load)
    reps = int(os.environ.get("BENCH_REPS", 3))
    reps_sd = int(os.environ.get("BENCH_REPS", 2))
    profile_name = os.environ.get("BENCH_PROFILE", "gpu" if DEVICE == "cuda" else "cpu")
    profile = PROFILES[profile_name]
    demo_train, demo_eval = REPO / "data/demo_llm_style/train.csv", REPO / "data/demo_llm_style/eval.csv"
    datasets = {"demo": demo_train, "varied": write_varied(work / "varied.csv"), "long": write_long(work / "long.csv")}
    machine = {"cpu": cpu_name(), "cores": torch.get_num_threads(), "bf16_units": cpu_has_bf16_units(),
               "torch": torch.__version__, "cuda": torch.cuda.is_available(), "profile": profile_name,
               "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None}
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"machine: {machine['cpu']}, {machine['cores']} threads, bf16 units: {machine['bf16_units']}, "
          f"GPU: {machine['gpu']}; profile {profile_name}: {profile}")
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    results: dict = {"machine": machine, "peak_flops": peak, "llm": {}, "sd": {}}

    only = os.environ.get("BENCH_ONLY", "")  # "llm" or "sd": one half, for quick work on it
    for name in profile["llm_data"] if only != "sd" else ():
        data = datasets[name]
        runs = {"ours": [], "trainer": []}
        for rep in range(reps):
            for impl in ("ours", "trainer"):  # A B A B
                r = run("llm_bench.py", impl, str(data), str(demo_eval), str(steps_llm), str(profile["llm_batch"]),
                        str(work / f"{impl}{rep}"), str(profile["llm_seq"]))
                runs[impl].append(r)
                print(f"  llm/{name} {impl} #{rep + 1}: {r['tokens'] / r['seconds']:.0f} tokens/s "
                      f"({r['process_seconds']:.0f} s in all)", flush=True)
        results["llm"][name] = runs

    if only == "llm" or not profile["sd_sources"]:
        report(results, steps_llm, steps_sd)
        return 0
    model_dir = build_sd(profile["sd"], work / f"{profile['sd']}-sd")
    from lora_scripts.demo import write_neon_images

    images = work / "neon"
    write_neon_images(images, n=12)
    sources = {"small": images}
    if "photo" in profile["sd_sources"]:
        sources["photo"] = write_photo_sized(images, work / "photos")
    for name, folder in sources.items():  # 256-384 px sources, then the same pictures at 1024-1536 px
        runs = {"ours": [], "baseline": []}
        os.environ["LORA_SCRIPTS_CACHE"] = str(work / f"cache-{name}")  # a cold latent cache for the first run
        for rep in range(reps_sd):
            for impl in ("ours", "baseline"):
                r = run("sd_bench.py", impl, str(model_dir), str(folder), str(steps_sd), str(work / f"sd-{impl}{rep}"),
                        str(profile["sd_resolution"]))
                runs[impl].append(r)
                print(f"  sd/{name} {impl} #{rep + 1}: {r['images'] / r['seconds']:.2f} images/s ({r['cache']}; "
                      f"{r['process_seconds']:.0f} s in all)", flush=True)
        results["sd"][name] = runs
    report(results, steps_llm, steps_sd)
    return 0


def build_sd(size: str, folder: Path) -> Path:
    from sd_bench import build_full_sd15, build_mid_sd

    return (build_full_sd15 if size == "full" else build_mid_sd)(folder)


def report(results: dict, steps_llm: int, steps_sd: int) -> None:
    profile_name = results["machine"]["profile"]
    rows = []
    peak = results["peak_flops"]["bf16"]
    for name, runs in results["llm"].items():
        o, b = runs["ours"], runs["trainer"]
        tps_o, tps_b = median(o, lambda r: r["tokens"] / r["seconds"]), median(b, lambda r: r["tokens"] / r["seconds"])
        rows.append((f"LLM {name}: trained tokens/s", tps_o, tps_b))
        rows.append(paired(f"LLM {name}: s / optimizer step", o, b, lambda r: statistics.median(r["step_seconds"])))
        rows.append(paired(f"LLM {name}: padding fraction", o, b, lambda r: r["padding_fraction"]))
        rows += memory_rows(f"LLM {name}", o, b)
        rows.append(paired(f"LLM {name}: final train loss", o, b, lambda r: r["final_train_loss"]))
        rows.append(paired(f"LLM {name}: eval loss", o, b, lambda r: r["eval_loss"]))
        mfu_o, mfu_b = 4 * SMOL_BODY_PARAMS * tps_o / peak, 4 * SMOL_BODY_PARAMS * tps_b / peak
        rows.append((f"LLM {name}: MFU vs bf16 matmul peak", mfu_o, mfu_b))
    for name, runs in results["sd"].items():
        rows += sd_rows(name, runs["ours"], runs["baseline"], steps_sd)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}} | {'ours':>10} | {'baseline':>10} | ours/baseline", "-" * (width + 44)]
    for label, a, bb in rows:
        ratio = f"{a / bb:.2f}x" if bb and "padding" not in label else ""  # no ratio of a zero fraction
        lines.append(f"{label:<{width}} | {a:>10.4g} | {bb:>10.4g} | {ratio}")
    for name, runs in results["sd"].items():
        lines.append(f"SD {name} sources, cache in the first run: {runs['ours'][0]['cache']}")
    if results["sd"]:
        profile = PROFILES[profile_name]
        lines.append(f"SD model: {SD_MODELS[profile['sd']]}, random weights, {profile['sd_resolution']} px, batch 4")
    if results["llm"]:
        lines.append(f"MFU = 4 x {SMOL_BODY_PARAMS / 1e6:.1f}M matmul weights x trained tokens/s / measured bf16 peak "
                     "(forward 2N + input-gradient backward 2N per token; LM head and attention scores not counted)")
    table = "\n".join(lines)
    print("\n" + table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    results["table"] = table
    # Only a full run with the default settings replaces the results the README quotes ("latest" for the CPU
    # profile, "latest-<profile>" for the others); a half run or one with fewer reps or steps goes to "latest-partial".
    tuned = [k for k in ("BENCH_ONLY", "BENCH_REPS", "BENCH_LLM_STEPS", "BENCH_SD_STEPS") if os.environ.get(k)]
    stem = "latest-partial" if tuned else "latest" if profile_name == "cpu" else f"latest-{profile_name}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    plot(rows, out / f"{stem}.png")


def paired(label: str, o: list[dict], b: list[dict], key) -> tuple[str, float, float]:
    """A table row: the median of `key` over our runs and over the baseline's."""
    return label, median(o, key), median(b, key)


def memory_rows(prefix: str, o: list[dict], b: list[dict]) -> list[tuple]:
    rows = [paired(f"{prefix}: peak RSS (MB)", o, b, lambda r: r["peak_rss_mb"])]
    if "peak_gpu_mb" in o[0]:
        rows.append(paired(f"{prefix}: peak GPU memory (MB)", o, b, lambda r: r["peak_gpu_mb"]))
    return rows


def sd_rows(name: str, o: list[dict], b: list[dict], steps_sd: int) -> list[tuple]:
    return [
        paired(f"SD {name}: images/s (after the cache is built)", o, b, lambda r: r["images"] / r["seconds"]),
        paired(f"SD {name}: s / step", o, b, lambda r: statistics.median(r["step_seconds"])),
        *memory_rows(f"SD {name}", o, b),
        paired(f"SD {name}: loss (mean of last 4 of {steps_sd} steps)", o, b, lambda r: r["final_loss"]),
    ]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [(label, a / b) for label, a, b in rows if ("tokens/s" in label or "images/s" in label) and b]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    labels, ratios = zip(*speed)
    bars = ax.barh(labels, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, r in zip(bars, ratios):
        ax.text(bar.get_width() + 0.02, bar.get_y() + bar.get_height() / 2, f"{r:.2f}x", va="center")
    ax.set_xlabel("throughput, ours / baseline (higher is better)")
    ax.set_xlim(0, max(ratios) * 1.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
