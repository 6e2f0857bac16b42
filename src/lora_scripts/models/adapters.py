"""What both families' adapter configs share: peft's name for the config's lora_init, and AdaLoRA's config
with its rank schedule filled in from the run's plan."""

from __future__ import annotations

from lora_scripts.config import TrainConfig

# lora_init -> peft's init_lora_weights ("default": peft's own start for LLMs, kohya's gaussian for images).
# PiSSA through peft's fast randomized SVD (4 subspace iterations), which peft recommends over a full SVD:
# seconds instead of minutes on 7B-size layers, for the same start.
PEFT_INIT = {"gaussian": "gaussian", "pissa": "pissa_niter_4", "olora": "olora"}


def peft_init(cfg: TrainConfig, default):
    return PEFT_INIT.get(cfg.lora_init, default)


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
