"""AdaLoRA's peft config, for either model family: the rank schedule filled in from the run's plan."""

from __future__ import annotations

from lora_scripts.config import TrainConfig


def adalora_config(cfg: TrainConfig, targets, total_steps: int, **peft_fields):
    """peft's AdaLoraConfig for `targets` in a run of `total_steps` optimizer steps.

    peft scales an AdaLoRA update by lora_alpha / init_r whatever rank a module keeps, like LoRA's
    alpha / r at the start. `r` is left at peft's default: AdaLoRA reads init_r, and warns when r is set.
    """
    from peft import AdaLoraConfig

    init_r, target_r = cfg.adalora_ranks
    tinit, tfinal = cfg.adalora_schedule(total_steps)
    return AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=cfg.adalora_delta_t,
                         total_step=total_steps, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                         target_modules=targets, **peft_fields)
