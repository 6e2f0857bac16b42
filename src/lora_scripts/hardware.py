"""What this machine trains with: its device, the precision that is fast on it, and its measured speed.

`mixed_precision: auto` (the default) is resolved here, from torch's own probes of the hardware:

- a CUDA GPU with native bf16 (Ampere and newer): bf16;
- an older CUDA GPU: fp16, with loss scaling;
- a CPU with bf16 units (AVX512-BF16, or AMX on recent Xeons): bf16;
- any other CPU: fp32. On an AVX2-only CPU torch emulates bf16 matmuls: measured on an AMD EPYC (2 cores,
  torch 2.13), a 1024^3 bf16 matmul ran at 0.8 GFLOP/s against ~36 GFLOP/s in fp32, ~45x slower, and
  the demo's first bf16 step took 162 s.

torch is imported inside the functions only, and only where it must be asked: on a Linux machine with no
GPU device files the device is the CPU, its bf16 units are read from /proc/cpuinfo, and the matmul speed of
an earlier measurement on the same CPU is read from the cache, so `validate` need not load torch at all.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Device files of a GPU torch could use (NVIDIA's driver and control nodes, AMD's ROCm); where none exists
# torch.cuda.is_available() is False, and torch need not be imported to learn it.
GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
# /proc/cpuinfo flags of native bf16 matmuls: the ones torch's probes (_is_avx512_bf16_supported,
# _is_amx_tile_supported) look for
BF16_FLAGS = {"avx512_bf16", "amx_tile", "amx_bf16"}

# bf16 matmul against fp32 on a CPU without bf16 units (AMD EPYC, AVX2 only, torch 2.13; measured)
EMULATED_BF16_SLOWDOWN = 45


@dataclass(frozen=True)
class Precision:
    """The training precision chosen for this run, in the config's words, and why."""

    name: str  # "no" | "fp16" | "bf16"
    device: str  # "cuda" | "cpu"
    reason: str

    @property
    def label(self) -> str:
        return "fp32" if self.name == "no" else self.name


def device_type() -> str:
    """cuda where a GPU is visible, unless ACCELERATE_USE_CPU (accelerate's own switch) asks for the CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not any(
            os.path.exists(f) for f in GPU_DEVICE_FILES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo (Linux); None where there is no such file or field."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == field), None)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as the kernel reports them; None where /proc/cpuinfo has none."""
    flags = _cpuinfo("flags")
    return set(flags.split()) if flags is not None else None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles): the flags the kernel
    reports, or torch's probes where there is no /proc/cpuinfo."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & BF16_FLAGS)
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cuda_has_bf16() -> bool:
    """Native bf16 on the current GPU. torch's default also answers True where it is only emulated."""
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def bf16_is_emulated(precision: str, device: str) -> bool:
    return precision == "bf16" and device == "cpu" and not cpu_has_bf16_units()


def choose_precision(requested: str) -> Precision:
    """`auto` resolved for this machine; any other setting is kept as written."""
    device = device_type()
    if requested != "auto":
        return Precision(requested, device, "as set in the config")
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
        if cuda_has_bf16():
            return Precision("bf16", device, f"{gpu} computes bf16 natively")
        return Precision("fp16", device, f"{gpu} has no native bf16; fp16 with loss scaling")
    if cpu_has_bf16_units():
        return Precision("bf16", device, "this CPU has bf16 units (AVX512-BF16/AMX)")
    return Precision("no", device, f"this CPU has no bf16 units; bf16 would be emulated, "
                                   f"~{EMULATED_BF16_SLOWDOWN}x slower")


def precision_warning(requested: str) -> str | None:
    """Why an explicitly chosen precision will be slow on this machine, or None."""
    if requested != "bf16":
        return None
    device = device_type()
    if device == "cpu" and not cpu_has_bf16_units():
        return (f"mixed_precision: bf16 on a CPU without bf16 units (no AVX512-BF16/AMX): torch emulates bf16 "
                f"there, ~{EMULATED_BF16_SLOWDOWN}x slower than fp32 (measured on an AVX2-only AMD EPYC). "
                "Use mixed_precision: auto (fp32 here) or no")
    if device == "cuda" and not cuda_has_bf16():
        return "mixed_precision: bf16 on a GPU without native bf16 is emulated and slow; use auto (fp16 here)"
    return None


@functools.cache
def matmul_flops(precision: str, device: str, seconds: float = 0.5) -> float:
    """This machine's matmul speed in the training precision: measured (`measure_matmul_flops`) once per CPU
    model, thread count and torch version, then read from the cache (`$LORA_SCRIPTS_CACHE/speed.json`);
    a GPU is measured each time (torch is loaded there anyway)."""
    if device != "cpu":
        return measure_matmul_flops(precision, device, seconds)
    from importlib.metadata import version

    from lora_scripts.atomic import write_text_atomic
    from lora_scripts.models.embedded import cache_root

    key = f"{cpu_name()}|{os.cpu_count()}|{os.environ.get('OMP_NUM_THREADS', '')}|torch {version('torch')}|{precision}"
    path = cache_root() / "speed.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_matmul_flops(precision, device, seconds)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(known, indent=1))
    return float(known[key])


def measure_matmul_flops(precision: str, device: str, seconds: float = 0.5) -> float:
    """Measured FLOP/s of a square matmul in the training precision: the machine's speed for the estimate.

    1024^3 is near the CPU's matmul peak in fp32 and with bf16 units; where bf16 is emulated (~1 GFLOP/s)
    256^3 keeps each product at tens of milliseconds; a GPU needs a larger product to fill it.
    """
    import torch

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device == "cpu" and precision == "fp16":
        dtype = torch.float32  # fp16 is not trained on CPUs (the preflight refuses it); fp32 is what runs
    n = 4096 if device == "cuda" else 256 if bf16_is_emulated(precision, device) else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    a @ b  # first call: kernel selection, not speed
    sync()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        a @ b
        sync()
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)
