"""Several training processes on one machine: this same command again under torchrun, one process per GPU,
or CPU ranks over gloo where there is no GPU (or ACCELERATE_USE_CPU=1)."""

from __future__ import annotations

import os
import subprocess
import sys


class LaunchError(RuntimeError):
    pass


def relaunch_train(num_processes: int, train_args: list[str]) -> int:
    """Run `lora-scripts train <train_args>` in `num_processes` ranks; their exit code."""
    import torch

    from lora_scripts.hardware import device_type

    env = dict(os.environ)
    if device_type() == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # accelerate then builds a CPU DDP over gloo
    elif torch.cuda.device_count() < num_processes:
        raise LaunchError(f"--num-processes {num_processes} runs one process per GPU and this machine has "
                          f"{torch.cuda.device_count()}; with ACCELERATE_USE_CPU=1 the processes run on the CPU instead")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
           "-m", "lora_scripts.cli", "train", *train_args]
    return subprocess.call(cmd, env=env)


def is_rank_process() -> bool:
    """True inside a process torchrun started (it must train, not launch again)."""
    return "LOCAL_RANK" in os.environ


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"
