"""The diffusers config folders that let `from_single_file` load SD checkpoints with no hub access.

diffusers needs a folder with model_index.json, each component's config.json and the tokenizer files to
turn an original-layout checkpoint into a pipeline; without one it asks the hub (STACK-NOTES). These are
the published configs of the base models, written out once into the cache by `config_folder()`.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from lora_scripts.models.embedded import cache_root

SCHEDULER_BASE = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None,
}

VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}

CLIP_L = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "vocab_size": 49408, "projection_dim": 768, "layer_norm_eps": 1e-05,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}

SD15 = {
    "model_index.json": {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae/config.json": VAE,
    "text_encoder/config.json": CLIP_L,
    "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "skip_prk_steps": True,
                                        "prediction_type": "epsilon", **SCHEDULER_BASE},
}

SD2 = {
    "model_index.json": {**SD15["model_index.json"], "scheduler": ["diffusers", "DDIMScheduler"]},
    "unet/config.json": {
        **SD15["unet/config.json"], "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True, "sample_size": 96,
    },
    "vae/config.json": {**VAE, "sample_size": 768},
    "text_encoder/config.json": {
        **CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
        "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512,
    },
    "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                                        **SCHEDULER_BASE},
}

SDXL = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "center_input_sample": False, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    },
    "vae/config.json": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder/config.json": CLIP_L,
    "text_encoder_2/config.json": {
        **CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "hidden_act": "gelu", "projection_dim": 1280,
    },
    "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                                        "prediction_type": "epsilon", "timestep_spacing": "leading",
                                        "use_karras_sigmas": False, **SCHEDULER_BASE},
}

CONFIGS = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}
# SD2's OpenCLIP and SDXL's second encoder pad with "!" (id 0); SD1.5's CLIP pads with the end token.
TOKENIZERS = {"sd15": {"tokenizer": "<|endoftext|>"}, "sd2": {"tokenizer": "!"},
              "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}}


def tokenizer_source() -> Path:
    return Path(str(resources.files("lora_scripts") / "resources" / "clip_tokenizer"))


def write_config_folder(files: dict[str, dict], tokenizers: dict[str, str], folder: Path) -> Path:
    """Write a weightless diffusers folder: the JSON configs plus CLIP tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2))
    for sub, pad in tokenizers.items():
        target = folder / sub
        target.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "LICENSE-open_clip.txt"):
            shutil.copy(tokenizer_source() / name, target / name)
        tok_cfg = json.loads((tokenizer_source() / "tokenizer_config.json").read_text())
        tok_cfg["pad_token"] = pad
        (target / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return folder


def config_folder(model_type: str) -> Path:
    """The shipped config folder for sd15 / sd2 / sdxl (written into the cache on first use)."""
    folder = cache_root() / "sd_configs" / f"{model_type}-v1"
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_config_folder(CONFIGS[model_type], TOKENIZERS[model_type], tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder
