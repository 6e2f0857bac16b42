"""The kohya / A1111 LoRA file: the format the WebUIs and ComfyUI load as `<lora:name:0.8>`.

Keys are `<prefix>_<module path with '.' → '_'>.lora_down.weight / .lora_up.weight / .alpha`:
- SD1.x/2.x UNet: `lora_unet_` + the diffusers module path (`..._attn1_to_out_0`);
- SDXL UNet: `lora_unet_` + the original SGM block path (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`);
- text encoders: `lora_te_` (SD1/2) or `lora_te1_` / `lora_te2_` (SDXL) + `text_model_encoder_layers_N_...`.
  transformers 5 has no `text_model.` level in its module paths; it is put back, since ComfyUI and A1111
  drop keys without it (STACK-NOTES).
`alpha` is the real lora_alpha of the run (A1111 applies up @ down × alpha / rank × multiplier); writing
alpha = rank, as diffusers' converter does, silently changes the strength.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from lora_scripts.export.adalora import adalora_module, is_adalora_layer
from lora_scripts.export.lora_set import LoraModule, LoraSet
from lora_scripts.export.scale import file_alpha
from lora_scripts.models.sd_convert import unet_module_to_original, unet_prefix_map

BASE_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def lora_modules(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """Module path → peft LoRA layer, for every adapted module of `model`."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and adapter in getattr(mod, "lora_A", {}):
            out[name] = mod
    return out


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def kohya_lora_set(unet, text_encoders: list, model_type: str, adapter: str = "default",
                   metadata: dict[str, str] | None = None, start: LoraSet | None = None) -> LoraSet:
    """The trained adapters of a live model under their kohya names, each with the alpha readers need.
    `start`: the adapters as a PiSSA/OLoRA run began (kohya_lora_set before training): each module is then
    written as trained minus start (LoraModule.minus), its update against the original weights; a module
    whose start is a plain one (B = 0: peft starts convolutions so) needs no such conversion."""
    modules: dict[str, LoraModule] = {}
    pm = unet_prefix_map(dict(unet.config)) if model_type == "sdxl" else None

    def add(key: str, mod) -> None:
        if is_adalora_layer(mod):  # the plain LoRA of the rank the module kept; none when it kept none
            if (module := adalora_module(mod, adapter)) is not None:
                modules[key] = module
            return
        down = mod.lora_A[adapter].weight.detach().cpu()
        up = mod.lora_B[adapter].weight.detach().cpu()
        # readers compute alpha / rank: the alpha that reproduces peft's scale (export/scale.py)
        alpha = file_alpha(mod.lora_alpha[adapter], down.shape[0], mod.use_rslora.get(adapter, False))
        dora = None
        magnitude = getattr(mod, "lora_magnitude_vector", None)
        if magnitude is not None and adapter in magnitude:
            m = magnitude[adapter].weight.detach().cpu()
            # DoRA: ComfyUI/LyCORIS read `dora_scale` as the per-output-row norm (out, 1[, 1, 1]).
            dora = m.reshape(m.shape[0], *([1] * (up.dim() - 1)))
        modules[key] = LoraModule(down, up, alpha, dora)
        first = start.modules.get(key) if start is not None else None
        if first is not None and bool(first.up.any()):
            modules[key] = modules[key].minus(first)

    for path, mod in lora_modules(unet, adapter).items():
        name = unet_module_to_original(path, pm) if pm is not None else path
        add(kohya_name("lora_unet", name), mod)
    prefixes = ["lora_te"] if model_type != "sdxl" else ["lora_te1", "lora_te2"]
    for prefix, te in zip(prefixes, text_encoders):
        for path, mod in lora_modules(te, adapter).items():
            path = path if path.startswith("text_model.") else f"text_model.{path}"
            add(kohya_name(prefix, path), mod)
    return LoraSet(modules, "kohya", dict(metadata or {}))


def kohya_tensors(lora: LoraSet, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors: `<name>.lora_down/.lora_up.weight`, `.alpha`, and `.dora_scale` for DoRA."""
    tensors = {}
    for name, m in lora.modules.items():
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        tensors[f"{name}.lora_down.weight"] = cast(m.down).contiguous()
        tensors[f"{name}.lora_up.weight"] = cast(m.up).contiguous()
        if m.alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype or m.down.dtype)
        if m.dora_scale is not None:
            tensors[f"{name}.dora_scale"] = cast(m.dora_scale).contiguous()
    return tensors


def kohya_state_dict(unet, text_encoders: list, model_type: str, dtype: torch.dtype,
                     adapter: str = "default") -> dict[str, torch.Tensor]:
    return kohya_tensors(kohya_lora_set(unet, text_encoders, model_type, adapter), dtype)


def write_kohya_file(lora: LoraSet, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The one kohya/A1111 writer, for training exports and the LoRA tools alike: the tensors, the LoraSet's
    metadata and kohya's two hashes of them, written atomically."""
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith("sshs_")}
    return write_kohya(Path(path), kohya_tensors(lora, dtype), metadata)


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` (sha256 of the bytes after the header) and `sshs_legacy_hash`."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    buf = io.BytesIO(data)
    buf.seek(0x100000)
    legacy = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def training_metadata(cfg, model_type: str, tag_frequency: dict, n_images: int, steps: int, epochs: int,
                      has_te: bool, rank: int) -> dict[str, str]:
    # the alpha the file's tensors carry (rsLoRA's alpha / sqrt(r) scale expressed over r), not the config's
    alpha = file_alpha(cfg.alpha, rank, cfg.lora_type == "rslora")
    if cfg.lora_type == "adalora":  # every module's alpha is init_r, the rest folded in (export/adalora.py)
        alpha = float(rank)
    network_args = {"conv_dim": str(rank), "conv_alpha": str(alpha)} if cfg.train_unet_conv else {}
    if cfg.lora_type == "adalora":  # ranks differ per module: the file's shapes say which
        network_args.update({"adalora_init_rank": str(rank), "adalora_target_rank": str(cfg.adalora_ranks[1])})
    if cfg.lora_type == "dora":
        network_args["dora_wd"] = "True"
    if cfg.loraplus_lr_ratio:  # kohya passes LoRA+ as a network argument of the same name
        network_args["loraplus_lr_ratio"] = str(cfg.loraplus_lr_ratio)
    return {
        "ss_output_name": cfg.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": BASE_VERSION[model_type],
        "ss_v2": str(model_type == "sd2"),
        "ss_sd_model_name": Path(cfg.base_model).name,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr) if has_te else "None",
        "ss_network_train_unet_only": str(not has_te),
        "ss_num_train_images": str(n_images),
        "ss_max_train_steps": str(steps),
        "ss_num_epochs": str(epochs),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_lr_scheduler": cfg.scheduler,
        "ss_optimizer": cfg.optimizer,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_v_parameterization": str(cfg.v_parameterization),
        "ss_training_finished_at": str(time.time()),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "lora_scripts_version": "0.1.0",
    }


def write_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    model_hash, legacy = safetensors_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the comma-separated tags, as kohya records it."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts: dict[str, int] = {}
        for c in captions:
            for tag in (t.strip() for t in c.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        out[folder] = counts
    return out
