"""Several training processes: this same command again, under torchrun (`--num-processes N`: one process per
GPU, or CPU ranks over gloo where there is no GPU or ACCELERATE_USE_CPU=1) or under `accelerate launch` with
an accelerate config file (`--accelerate-config FILE`, e.g. configs/accelerate/ddp.yaml), which can also
span several machines."""

from __future__ import annotations

import os
import subprocess
import sys

from lora_scripts.train.errors import UnsupportedLaunchError


class LaunchError(RuntimeError):
    pass


# Set in the processes a launch starts: they train. (accelerate launch starts a single process without the
# LOCAL_RANK that torchrun sets; without this it would launch again, forever.)
LAUNCHED = "LORA_SCRIPTS_LAUNCHED"


def launch_command(num_processes: int, train_args: list[str], accelerate_config: str | None = None,
                   on_cpu: bool = False) -> list[str]:
    """The command that runs `lora-scripts train <train_args>` in several processes."""
    entry = ["-m", "lora_scripts.cli", "train", *train_args]
    if accelerate_config is None:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
                *entry]
    if not os.path.isfile(accelerate_config):
        raise LaunchError(f"--accelerate-config {accelerate_config}: no such file (the shipped ones are in "
                          "configs/accelerate/: ddp.yaml)")
    # the file's process count unless --num-processes says otherwise; its GPU launcher also starts CPU
    # ranks over gloo (accelerate's own --cpu flag would start one process)
    count = [f"--num_processes={num_processes}"] if num_processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, *count,
            *(["--num_cpu_threads_per_process=1"] if on_cpu else []), *entry]


def relaunch_train(num_processes: int, train_args: list[str], accelerate_config: str | None = None) -> int:
    """Run `lora-scripts train <train_args>` in `num_processes` ranks (or as `accelerate_config` says); their
    exit code."""
    import torch

    from lora_scripts.hardware import device_type

    env = {**os.environ, LAUNCHED: "1"}
    on_cpu = device_type() == "cpu"
    if on_cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # accelerate then builds a CPU DDP over gloo
    elif accelerate_config is None and torch.cuda.device_count() < num_processes:
        raise LaunchError(f"--num-processes {num_processes} runs one process per GPU and this machine has "
                          f"{torch.cuda.device_count()}; with ACCELERATE_USE_CPU=1 the processes run on the CPU instead")
    return subprocess.call(launch_command(num_processes, train_args, accelerate_config, on_cpu), env=env)


def is_rank_process() -> bool:
    """True inside a process a launch started (it must train, not launch again)."""
    return "LOCAL_RANK" in os.environ or os.environ.get(LAUNCHED) == "1"


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


# Where every process holds a shard of the model, not all of it: the trainer's exports, checkpoints and sample
# writers read the adapter from the main process's modules and run generation on it alone, so such a run
# would hang at its first sample or save a shard as the adapter.
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_distributed_type(kind: str, environ=None) -> None:
    """Refuse a launch whose processes would each hold a shard of the model (FSDP, DeepSpeed ZeRO, Megatron).
    `accelerate launch` with such a config on a machine without GPUs does not shard: it runs the processes
    as plain CPU data parallel (seen with accelerate 1.15). Its environment still says what was asked for,
    and that is refused too, rather than silently training another way than the config says."""
    environ = os.environ if environ is None else environ
    asked = [k for k in SHARDED if environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
    kind = asked[0] if asked and kind not in SHARDED else kind
    if kind in SHARDED:
        raise UnsupportedLaunchError(
            f"this run was launched with {kind}, which shards the model across processes; lora-scripts trains "
            "data-parallel only so far (each process holds the whole model). Use configs/accelerate/ddp.yaml or "
            "--num-processes N")
