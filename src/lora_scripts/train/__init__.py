"""Training: one plain loop per model family (llm.py, sd.py) around the run and optimizer step they share
(run.py), with checkpoints (checkpoint.py), step planning (plan.py) and the event stream (events.py)."""

from __future__ import annotations


def train(cfg, progress: bool = True, callback=None):
    """Train the family `cfg.model_type` names ("llm", or an SD type); the loop's result.

    The loops are imported here, not at the top: importing `lora_scripts.train.plan` (as the preflight
    does) must not load torch.
    """
    from lora_scripts.config import ConfigError
    from lora_scripts.config_rules import keys_for_other_family
    from lora_scripts.models.detect import detect_model_type

    if cfg.model_type is None:
        cfg = cfg.model_copy(update={"model_type": detect_model_type(cfg.base_model)})
    problems = keys_for_other_family(cfg, cfg.model_type)
    if problems:  # the preflight reports these too; a library caller that skipped it hears them here
        raise ConfigError("\n".join(problems))
    if cfg.model_type == "llm":
        from lora_scripts.train.llm import train_llm

        return train_llm(cfg, callback, progress)
    from lora_scripts.train.sd import train_sd

    return train_sd(cfg, callback, progress)
