"""`make bench`: ours against what users would run instead, side by side in one invocation.

LLM (SmolLM2-135M-Instruct, LoRA r=8 q/k/v/o, batch 4), on the demo dataset and on a length-varied one:
ours vs transformers Trainer + PEFT (padded batches) and vs TRL's SFTTrainer (padding-free, completion-only
loss). SD (SD1.5's full architecture, random weights, 256 px on a CPU): ours vs a loop written like diffusers'
train_text_to_image_lora.py (encodes every step) and vs a kohya-style loop (latents and text embeddings
cached up front). Every side trains in the precision this machine supports: bf16 autocast where the CPU
has bf16 units (or the GPU computes bf16), fp32 on a CPU without them (bf16 is emulated there, ~45x slower).
Runs alternate A B C A B C in fresh processes; the table shows medians and ratios (ours / each baseline),
and bench/results/latest-<cpu kind>.json + .png keep them.
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

from lora_scripts.hardware import choose_precision, cpu_flags, cpu_has_bf16_units, cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_data import write_long, write_photo_sized, write_varied  # noqa: E402

# SmolLM2-135M: 30 layers x (q,o 576x576; k,v 576x192; gate/up/down 576x1536): weights in matmuls
SMOL_BODY_PARAMS = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


# What each profile trains. "cpu": sized for a 2-core machine; SD on SD1.5's full-size architecture at 256 px.
# "gpu": SmolLM2 at seq 512 batch 8; SD1.5's full UNet, random weights, 512 px, batch 4. "cpu-mid": SD only, on
# a model with every width quartered, a quick profile for work on the SD loop; not representative, as it shrinks
# the VAE and text encoder (which the example runs at every step) as much as the UNet.
PROFILES = {
    "cpu": {"llm_batch": 4, "llm_seq": 512, "llm_data": ("demo",), "sd": "full", "sd_resolution": 256,
            "sd_sources": ("small",)},
    "cpu-llm": {"llm_batch": 4, "llm_seq": 512, "llm_data": ("demo", "varied"), "sd_sources": ()},
    "gpu": {"llm_batch": 8, "llm_seq": 512, "llm_data": ("demo", "long"), "sd": "full", "sd_resolution": 512,
            "sd_sources": ("small", "photo")},
    "cpu-mid": {"llm_data": (), "sd": "mid", "sd_resolution": 256, "sd_sources": ("small", "photo")},
}
LLM_SIDES = ("ours", "trainer", "trl")
SD_SIDES = ("ours", "example", "kohya")
BASELINE_NAMES = {"trainer": "transformers Trainer + PEFT (padded)", "trl": "TRL SFTTrainer (padding-free)",
                  "example": "diffusers example loop", "kohya": "kohya-style cached loop"}
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


def machine_kind() -> str:
    """The results file's name: one per kind of machine the README has a table for."""
    if DEVICE == "cuda":
        return "gpu"
    return "cpu-bf16" if cpu_has_bf16_units() else "cpu-fp32"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))  # models, data and outputs of the runs: ~5 GB for SD1.5
    try:
        return bench(work)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"the runs' folders are kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path) -> int:
    # LLM 8 steps, SD 6, the first 2 not timed (one-time allocations and kernel selection): on a 2-core CPU an
    # SD1.5 step takes 15-30 s and the whole bench must stay under 15 minutes
    steps_llm, steps_sd = int(os.environ.get("BENCH_LLM_STEPS", 8)), int(os.environ.get("BENCH_SD_STEPS", 6))
    # A B C A B C: medians of 2 against this machine's drift; more reps would pass the 15-minute budget
    reps = int(os.environ.get("BENCH_REPS", 2))
    reps_sd = int(os.environ.get("BENCH_REPS", 1))  # an SD1.5 step is long (~10-20 s on 2 cores): one run each
    profile_name = os.environ.get("BENCH_PROFILE", "gpu" if DEVICE == "cuda" else "cpu")
    profile = PROFILES[profile_name]
    precision = choose_precision("auto")
    demo_train, demo_eval = REPO / "data/demo_llm_style/train.csv", REPO / "data/demo_llm_style/eval.csv"
    datasets = {"demo": demo_train, "varied": write_varied(work / "varied.csv"), "long": write_long(work / "long.csv")}
    flags = sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    machine = {"cpu": cpu_name(), "cores": torch.get_num_threads(), "bf16_units": cpu_has_bf16_units(),
               "flags": flags, "torch": torch.__version__, "cuda": torch.cuda.is_available(), "profile": profile_name,
               "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None, "kind": machine_kind(),
               "precision": precision.label, "precision_reason": precision.reason}
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision.name]
    peak = matmul_peak(dtype)
    print(f"machine: {machine['cpu']}, {machine['cores']} threads, flags {' '.join(flags) or '-'}, "
          f"GPU: {machine['gpu']}; profile {profile_name}: {profile}")
    print(f"precision for every side: {precision.label} ({precision.reason}); "
          f"matmul peak in it: {peak / 1e9:.0f} GFLOP/s", flush=True)
    results: dict = {"machine": machine, "peak_flops": peak, "llm": {}, "sd": {}}

    only = os.environ.get("BENCH_ONLY", "")  # "llm" or "sd": one half, for quick work on it
    for name in profile["llm_data"] if only != "sd" else ():
        runs = {side: [] for side in LLM_SIDES}
        for rep in range(reps):
            for side in LLM_SIDES:  # A B C A B C
                r = run("llm_bench.py", side, str(datasets[name]), str(demo_eval), str(steps_llm),
                        str(profile["llm_batch"]), str(work / f"{side}{rep}"), str(profile["llm_seq"]), precision.name)
                runs[side].append(r)
                print(f"  llm/{name} {side} #{rep + 1}: {r['tokens'] / r['seconds']:.0f} tokens/s "
                      f"({r['process_seconds']:.0f} s in all)", flush=True)
        results["llm"][name] = runs

    if only != "llm" and profile["sd_sources"]:
        bench_sd(work, profile, precision.name, steps_sd, reps_sd, results)
    report(results, steps_sd)
    return 0


def bench_sd(work: Path, profile: dict, precision: str, steps_sd: int, reps_sd: int, results: dict) -> None:
    from sd_bench import build_full_sd15, build_mid_sd, step_flops

    from lora_scripts.demo import write_neon_images

    t0 = time.perf_counter()
    model_dir = (build_full_sd15 if profile["sd"] == "full" else build_mid_sd)(work / f"{profile['sd']}-sd")
    print(f"  SD model written in {time.perf_counter() - t0:.0f} s", flush=True)
    results["sd_flops"] = step_flops(str(model_dir), profile["sd_resolution"])
    images = work / "neon"
    write_neon_images(images, n=8)
    sources = {"small": images}
    if "photo" in profile["sd_sources"]:
        sources["photo"] = write_photo_sized(images, work / "photos")
    for name, folder in sources.items():  # 256-384 px sources, then the same pictures at 1024-1536 px
        runs = {side: [] for side in SD_SIDES}
        os.environ["LORA_SCRIPTS_CACHE"] = str(work / f"cache-{name}")  # a cold latent cache for the first run
        for rep in range(reps_sd):
            for side in SD_SIDES:
                r = run("sd_bench.py", side, str(model_dir), str(folder), str(steps_sd), str(work / f"sd-{side}{rep}"),
                        str(profile["sd_resolution"]), precision)
                runs[side].append(r)
                print(f"  sd/{name} {side} #{rep + 1}: {r['images'] / r['seconds']:.2f} images/s ({r['cache']}; "
                      f"{r['process_seconds']:.0f} s in all)", flush=True)
        results["sd"][name] = runs


def report(results: dict, steps_sd: int) -> None:
    machine = results["machine"]
    rows = []
    for name, runs in results["llm"].items():
        rows += llm_rows(name, runs, results["peak_flops"], machine["precision"])
    for name, runs in results["sd"].items():
        rows += sd_rows(name, runs, steps_sd)
        flops = results["sd_flops"]
        per_image = {"ours": flops["unet_step"] / 4, "example": (flops["unet_step"] + flops["encoders"]) / 4,
                     "kohya": flops["unet_step"] / 4}
        rows.append((f"SD {name}: MFU vs {machine['precision']} matmul peak",
                     [median(runs[side], lambda r: r["images"] / r["seconds"]) * per_image[side] / results["peak_flops"]
                      for side in SD_SIDES]))
    sides = ["ours", "baseline 1", "baseline 2"]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}} | {sides[0]:>10} | {sides[1]:>10} | {sides[2]:>10} | ours/1 | ours/2",
             "-" * (width + 62)]
    for label, values in rows:
        o, b1, b2 = values
        ratios = [f"{o / b:.2f}x" if b and "padding" not in label else "" for b in (b1, b2)]
        lines.append(f"{label:<{width}} | {o:>10.4g} | {b1:>10.4g} | {b2:>10.4g} | {ratios[0]:>6} | {ratios[1]:>6}")
    if results["llm"]:
        lines.append(f"LLM baselines: 1 = {BASELINE_NAMES['trainer']}, 2 = {BASELINE_NAMES['trl']}")
        lines.append(f"MFU = 4 x {SMOL_BODY_PARAMS / 1e6:.1f}M matmul weights x trained tokens/s / measured "
                     f"{machine['precision']} matmul peak (forward 2N + input-gradient backward 2N per token; LM head "
                     "and attention scores not counted)")
    if results["sd"]:
        profile = PROFILES[machine["profile"]]
        lines.append(f"SD baselines: 1 = {BASELINE_NAMES['example']}, 2 = {BASELINE_NAMES['kohya']}; model: "
                     f"{SD_MODELS[profile['sd']]}, random weights, {profile['sd_resolution']} px, batch 4")
        flops = results["sd_flops"]
        lines.append(f"SD MFU = FLOPs of a step (torch's FlopCounterMode: UNet forward + backward "
                     f"{flops['unet_step'] / 1e12:.2f} TFLOP per batch of 4; the example adds VAE encode + text encoder "
                     f"{flops['encoders'] / 1e12:.2f}) x steps/s / measured {machine['precision']} matmul peak")
        for name, runs in results["sd"].items():
            lines.append(f"SD {name}: ours' latent cache in the first run: {runs['ours'][0]['cache']}; "
                         f"kohya-style: {runs['kohya'][0]['cache']}")
    lines.append(f"precision: {machine['precision']} on every side ({machine['precision_reason']})")
    table = "\n".join(lines)
    print("\n" + table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    results["table"] = table
    # Only a full run with the default settings replaces the results the README quotes (one file per kind of
    # machine: latest-cpu-fp32, latest-cpu-bf16, latest-gpu; other profiles add theirs); a half run or one with
    # fewer reps or steps goes to "latest-partial".
    tuned = [k for k in ("BENCH_ONLY", "BENCH_REPS", "BENCH_LLM_STEPS", "BENCH_SD_STEPS") if os.environ.get(k)]
    default_profile = machine["profile"] == ("gpu" if DEVICE == "cuda" else "cpu")
    stem = ("latest-partial" if tuned else f"latest-{machine['kind']}" if default_profile
            else f"latest-{machine['kind']}-{machine['profile']}")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    plot(rows, out / f"{stem}.png")


def triple(label: str, runs: dict, sides: tuple[str, ...], key) -> tuple[str, list[float]]:
    """A table row: the median of `key` over the runs of each side, ours first."""
    return label, [median(runs[side], key) for side in sides]


def llm_rows(name: str, runs: dict, peak: float, precision: str) -> list[tuple]:
    tps = [median(runs[side], lambda r: r["tokens"] / r["seconds"]) for side in LLM_SIDES]
    return [
        (f"LLM {name}: trained tokens/s", tps),
        triple(f"LLM {name}: s / optimizer step", runs, LLM_SIDES, lambda r: statistics.median(r["step_seconds"])),
        triple(f"LLM {name}: padding fraction", runs, LLM_SIDES, lambda r: r["padding_fraction"]),
        *memory_rows(f"LLM {name}", runs, LLM_SIDES),
        triple(f"LLM {name}: final train loss", runs, LLM_SIDES, lambda r: r["final_train_loss"]),
        triple(f"LLM {name}: eval loss", runs, LLM_SIDES, lambda r: r["eval_loss"]),
        (f"LLM {name}: MFU vs {precision} matmul peak", [4 * SMOL_BODY_PARAMS * t / peak for t in tps]),
    ]


def memory_rows(prefix: str, runs: dict, sides: tuple[str, ...]) -> list[tuple]:
    rows = [triple(f"{prefix}: peak RSS (MB)", runs, sides, lambda r: r["peak_rss_mb"])]
    if "peak_gpu_mb" in runs[sides[0]][0]:
        rows.append(triple(f"{prefix}: peak GPU memory (MB)", runs, sides, lambda r: r["peak_gpu_mb"]))
    return rows


def sd_rows(name: str, runs: dict, steps_sd: int) -> list[tuple]:
    return [
        triple(f"SD {name}: images/s (after the caches are built)", runs, SD_SIDES,
               lambda r: r["images"] / r["seconds"]),
        triple(f"SD {name}: s / step", runs, SD_SIDES, lambda r: statistics.median(r["step_seconds"])),
        *memory_rows(f"SD {name}", runs, SD_SIDES),
        triple(f"SD {name}: loss (mean of last 4 of {steps_sd} steps)", runs, SD_SIDES, lambda r: r["final_loss"]),
    ]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"LLM": (BASELINE_NAMES["trainer"], BASELINE_NAMES["trl"]),
             "SD": (BASELINE_NAMES["example"], BASELINE_NAMES["kohya"])}
    speed = []
    for label, (o, b1, b2) in rows:
        if "tokens/s" in label or "images/s" in label:
            family = label.split()[0]
            speed += [(f"{label.split(':')[0]} vs {names[family][k]}", o / b) for k, b in enumerate((b1, b2)) if b]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(speed) + 1.2), dpi=110)
    labels, ratios = zip(*speed)
    bars = ax.barh(labels, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, r in zip(bars, ratios):
        ax.text(bar.get_width() + 0.02, bar.get_y() + bar.get_height() / 2, f"{r:.2f}x", va="center")
    ax.set_xlabel("throughput, ours / baseline (higher is better)")
    ax.set_xlim(0, max(ratios) * 1.25)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
