"""Stable Diffusion builders and loaders (SD1.x, SD2.x, SDXL), offline.

Single-file checkpoints load through diffusers' `from_single_file` with a local config folder (the shipped
one for the model type, or `model_config_dir`), so nothing is looked up on a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.models.adapters import adalora_config, peft_init
from lora_scripts.models.detect import SD2_PREDICTION_UNKNOWN, declared_prediction_type
from lora_scripts.models.mapped import copy_off_the_file
from lora_scripts.models.sd_configs import config_folder, write_config_folder
from lora_scripts.safety import UnsafeFileError, check_safetensors

if TYPE_CHECKING:
    from lora_scripts.data.sd_data import Sample

# SDXL's second text encoder must be wider than the first even in a tiny model: diffusers tells the two
# apart in a single-file checkpoint by their embedding widths (768 vs 1280 in the real one).
XL_TE2_EXTRA = 16
# The SD adapter targets: UNet attention projections, the 3x3/1x1 convolutions LoCon adds, and the
# text encoders' attention projections. `all-linear` is kohya's default network: every Linear and 1x1 conv
# inside the UNet's transformer blocks (attention, proj_in/proj_out, feed-forward) and the text encoders'
# attention and MLP; the ResNet blocks' time-embedding projections stay out, as in kohya.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_TRANSFORMER_LINEAR = [*UNET_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV = ["conv1", "conv2", "proj_in", "proj_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TE_ALL_LINEAR = [*TE_TARGETS, "fc1", "fc2"]
PIPELINES = {"sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


class SDLoadError(RuntimeError):
    pass


@dataclass
class SDModel:
    """The parts a training loop needs, plus the pipeline for sampling and export."""

    pipe: object
    model_type: str
    prediction_type: str  # "epsilon" | "v_prediction"

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoders(self) -> list:
        return [te for te in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if te is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]


def _frozen_layers(unet: torch.nn.Module, frozen_only: bool = True) -> dict[str, torch.nn.Module]:
    """Frozen Linear and Conv2d layers (peft's adapters are trainable, so left out), by their plain name."""
    return {name.replace(".base_layer", ""): mod for name, mod in unet.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not (frozen_only and mod.weight.requires_grad)}


def store_frozen_layers_in(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen Linear and Conv2d weights and biases in `dtype` (the autocast dtype) for training.

    Autocast runs these layers in `dtype` anyway and casts each fp32 weight afresh on every forward: a
    copy of the UNet per step. Cast once, the step is bitwise the same (tested) and the UNet takes about
    half the memory. diffusers' example and kohya keep their frozen UNet in the mixed-precision dtype for
    the same reason (the whole UNet, norms too; here norms stay fp32, as autocast computes them).
    restore_frozen_layers puts the exact fp32 weights back. The other tensors are copied off the
    memory-mapped model file (models/mapped.py).
    """
    for mod in _frozen_layers(unet).values():
        mod.weight.data = mod.weight.data.to(dtype)
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.to(dtype)
    copy_off_the_file(unet, dtype)


def restore_frozen_layers(unet: torch.nn.Module, fresh_unet: torch.nn.Module) -> None:
    """Undo store_frozen_layers_in with the weights of `fresh_unet`, the same UNet loaded again."""
    fresh = _frozen_layers(fresh_unet, frozen_only=False)  # a model as loaded: nothing frozen yet
    for name, mod in _frozen_layers(unet).items():
        if mod.weight.dtype != fresh[name].weight.dtype:
            mod.weight.data = fresh[name].weight.data
            if mod.bias is not None:
                mod.bias.data = fresh[name].bias.data


def _pipeline_class(model_type: str):
    import diffusers

    return getattr(diffusers, PIPELINES[model_type])


def check_pickle_safe(path: Path) -> None:
    """Refuse a .ckpt/.pt that needs arbitrary code to unpickle (weights_only=True fails on it)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SDLoadError(
            f"{path}: refused: this pickle checkpoint holds more than tensors and could run code when loaded "
            f"({type(exc).__name__}). Use a .safetensors version of the model."
        ) from None


def load_sd(base_model: str, model_type: str, config_dir: Path | None = None,
            v_parameterization: bool | None = None) -> SDModel:
    """An SD pipeline (fp32, CPU) from a diffusers folder or a single-file checkpoint."""
    path = Path(base_model)
    cls = _pipeline_class(model_type)
    try:
        if path.is_dir():
            pipe = cls.from_pretrained(path, local_files_only=True, safety_checker=None) if model_type != "sdxl" \
                else cls.from_pretrained(path, local_files_only=True)
        else:
            if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
                check_pickle_safe(path)
            elif path.suffix.lower() == ".safetensors":
                check_safetensors(path)
            cfg = Path(config_dir) if config_dir else config_folder(model_type)
            kwargs = {"safety_checker": None} if model_type != "sdxl" else {}
            pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, **kwargs)
    except (SDLoadError, UnsafeFileError):
        raise
    except Exception as exc:
        raise SDLoadError(f"{base_model}: could not load it as {model_type}: {exc}") from None
    prediction = prediction_type_of(base_model, model_type, v_parameterization)
    # the sampler predicts what the model was trained to predict
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    return SDModel(pipe=pipe, model_type=model_type, prediction_type=prediction)


def prediction_type_of(base_model: str, model_type: str, v_parameterization: bool | None) -> str:
    """What the UNet predicts: `v_parameterization` when set, else what the checkpoint declares, else
    noise (epsilon) for SD1.x/SDXL. An SD 2.x single file that declares nothing is refused: the 768-v
    models predict v and the 512-base ones noise, from identical keys, and a wrong guess trains garbage."""
    if v_parameterization is not None:
        return "v_prediction" if v_parameterization else "epsilon"
    declared = declared_prediction_type(base_model)
    if declared is not None:
        return declared
    if model_type == "sd2":
        raise SDLoadError(SD2_PREDICTION_UNKNOWN.format(base=base_model))
    return "epsilon"


def build_tiny_sd(model_type: str = "sd15", seed: int = 0, width: int = 32, cross_dim: int = 32):
    """A small SD pipeline of the real architecture (random weights), for tests and benchmarks.

    `width` scales the UNet/VAE channels; attention heads keep a real head size (8 channels per head at
    width 32, like SD's 40-160 at full width) so attention behaves as in the real model.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    w = width
    if model_type == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(w, 2 * w), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim + XL_TE2_EXTRA + cross_dim,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + cross_dim + XL_TE2_EXTRA,
            sample_size=32, norm_num_groups=min(32, w),
        )
    else:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(w, 2 * w), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
            attention_head_dim=8, sample_size=32, norm_num_groups=min(32, w),
            use_linear_projection=model_type == "sd2",
        )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(w, w, 2 * w, 2 * w), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=min(32, w), sample_size=64,
        scaling_factor=0.13025 if model_type == "sdxl" else 0.18215,
    )
    te_cfg = dict(hidden_size=cross_dim, intermediate_size=2 * cross_dim, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=49408, max_position_embeddings=77, projection_dim=cross_dim)
    import tempfile

    from lora_scripts.models.sd_configs import CONFIGS, TOKENIZERS

    with tempfile.TemporaryDirectory() as tmp:
        write_config_folder({}, TOKENIZERS[model_type], Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer_2") if model_type == "sdxl" else None
    scheduler_cfg = dict(CONFIGS[model_type]["scheduler/scheduler_config.json"])
    sched_cls = getattr(diffusers, scheduler_cfg.pop("_class_name"))
    scheduler = sched_cls.from_config(scheduler_cfg)
    if model_type == "sdxl":
        te1 = CLIPTextModel(CLIPTextConfig(**te_cfg))
        wide = cross_dim + XL_TE2_EXTRA
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te_cfg, "hidden_size": wide, "intermediate_size": 2 * wide,
                                                            "projection_dim": wide, "hidden_act": "gelu"}))
        return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                                   tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def save_single_file(pipe, checkpoint: Path, config_dir: Path) -> tuple[Path, Path]:
    """`pipe` as an original-layout single-file checkpoint plus the config folder that loads it offline."""
    from safetensors.torch import save_file

    from lora_scripts.models.sd_convert import pipeline_to_original

    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_original(pipe), str(checkpoint))
    save_config_folder_for(pipe, Path(config_dir))
    return Path(checkpoint), Path(config_dir)


def save_config_folder_for(pipe, folder: Path) -> Path:
    """A weightless config folder describing `pipe` (for from_single_file of a non-standard model)."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is not None:
            te.config.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            tok.save_pretrained(folder / name)
    return folder


# ---- adapters and conditioning ----------------------------------------------------------------------------


def adapter_targets(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(UNet targets, text-encoder targets) for the config's target_modules and train_unet_conv."""
    if cfg.target_modules == "all-linear":
        unet, te = UNET_TRANSFORMER_LINEAR, TE_ALL_LINEAR
    else:
        unet, te = cfg.target_modules or UNET_ATTENTION, TE_TARGETS
    if cfg.train_unet_conv:
        unet = unet + [m for m in UNET_CONV if m not in unet]
    return list(unet), list(te)


def lora_config_for(cfg: TrainConfig, targets: list[str], total_steps: int | None = None):
    """The peft config of an adapter on `targets`: AdaLoRA's for the UNet when lora_type is adalora and
    `total_steps` (the planned optimizer steps) is given, else LoRA's (text encoders: always)."""
    from peft import LoraConfig

    if cfg.lora_type == "adalora" and total_steps is not None:
        return adalora_config(cfg, targets, total_steps)
    if cfg.lora_type == "adalora":  # the text encoders of an AdaLoRA run: plain LoRA at lora_rank
        return LoraConfig(r=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank if cfg.lora_alpha is None else cfg.alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=targets, init_lora_weights="gaussian")

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      init_lora_weights=peft_init(cfg, "gaussian"), use_dora=cfg.lora_type == "dora",
                      use_rslora=cfg.lora_type == "rslora")


def add_text_encoder_adapter(te, config) -> None:
    """peft LoRA layers in a transformers text encoder.

    transformers' own `add_adapter` demands peft >= 0.22, which the registry does not have yet; peft's
    injector does the same work. `peft_config` is recorded the way transformers does, so diffusers' and
    peft's state-dict helpers find the adapter.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, te, adapter_name="default")
    te.peft_config = {"default": config}
    te._hf_peft_config_loaded = True


def encode_prompts(model: SDModel, captions: list[str], encoders: list | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77, D) encoder hidden states and, for SDXL, the (B, D2) pooled embedding.

    `encoders`: the text encoders to call, when they are trained (wrapped for several processes).
    """
    encoders = encoders or model.text_encoders
    device = model.unet.device
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device) for tok in model.tokenizers]
    if model.model_type != "sdxl":
        return encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for te, tok_ids in zip(encoders, ids):
        out = te(tok_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(samples: list[Sample]) -> torch.Tensor:
    """(B, 6): original size, crop top-left and target size, as SDXL was conditioned."""
    rows = []
    for s in samples:
        w, h = s.bucket
        rows.append([h, w, 0, 0, h, w])
    return torch.tensor(rows, dtype=torch.float32)
