"""Rules about config keys beyond their types: which family reads a key, and which keys a resume may change.

Kept beside config.py (and, like it, free of ML libraries) so the preflight applies them before any model
loads; `train` applies them again for library callers.
"""

from __future__ import annotations

import json
from typing import Any

from lora_scripts.config import TrainConfig

# Keys only one family reads; every other key is read by both. The preflight (and `train`) refuses a key
# set for the other family, so no setting is dropped without a word. Checked against the family after
# `model_type` is sniffed, so a config gets the same answer whether it names its model_type or not.
IMAGE_ONLY_KEYS = (
    "resolution", "repeats", "trigger_word", "shuffle_caption", "keep_tokens", "caption_dropout_rate", "flip_aug",
    "noise_offset", "min_snr_gamma", "v_parameterization", "train_unet_conv", "cache_latents", "model_config_dir",
    "sample_steps", "sample_guidance", "sample_negative_prompt", "save_precision", "text_encoder_lr",
)
LLM_ONLY_KEYS = ("max_seq_length", "max_new_tokens", "drift_check")


# Keys a resumed run may change: how long it runs, how fast, what it saves, logs and samples. Every other
# key shapes the trained weights, so a resume with another value would not continue the same run.
RESUMABLE_CHANGES = (
    "epochs", "max_train_steps", "mixed_precision", "gradient_checkpointing", "cache_latents", "skip_nan_steps",
    "output_dir", "output_name", "logging_dir", "save_steps", "save_total_limit", "save_precision", "resume_from",
    "resume_force", "sample_every_n_epochs", "sample_steps", "sample_guidance", "sample_negative_prompt",
    "sample_prompts", "max_new_tokens", "drift_check",
)


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that shape the trained weights, as JSON values (recorded in every checkpoint)."""
    data = json.loads(cfg.model_dump_json())
    data["lora_alpha"] = cfg.alpha
    return {k: v for k, v in data.items() if k not in RESUMABLE_CHANGES}


def keys_for_other_family(cfg: TrainConfig, model_type: str) -> list[str]:
    """One message per key the config sets to a non-default value that the `model_type` run would not read.
    A key written at its default value changes nothing, so it is not reported (a copied default config
    keeps working)."""
    llm = model_type == "llm"
    problems = []
    for key in IMAGE_ONLY_KEYS if llm else LLM_ONLY_KEYS:
        value = getattr(cfg, key)
        if key in cfg.model_fields_set and value != TrainConfig.model_fields[key].get_default(call_default_factory=True):
            if llm:
                why = "an LLM has no text encoder of its own to train" if key == "text_encoder_lr" else "this is an LLM run"
                problems.append(f"{key}: {value!r} applies to image models (Stable Diffusion); {why}. Remove it")
            else:
                problems.append(f"{key}: {value!r} applies to LLM runs; this is an image run ({model_type}). Remove it")
    return problems


def key_family(key: str) -> str:
    """Which runs read a key: "image", "llm" or "both"."""
    return "image" if key in IMAGE_ONLY_KEYS else "llm" if key in LLM_ONLY_KEYS else "both"


def describe_keys() -> str:
    """Every config key with its type, default, the family that reads it and its documentation, for
    `lora-scripts validate --keys`."""
    lines = []
    for key, field in TrainConfig.model_fields.items():
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        family = {"image": "; image runs", "llm": "; LLM runs", "both": ""}[key_family(key)]
        lines.append(f"{key}  ({default}{family})")
        for doc_line in (field.description or "").split("\n"):
            lines.append(f"    {doc_line.strip()}")
    return "\n".join(lines)
