"""diffusers → original (CompVis/SGM) key layout, for single-file checkpoints the WebUIs load.

diffusers reads original checkpoints but has no writer for them. The UNet map is derived from the
block layout in the UNet's config, so it holds for SD1.x/2.x and SDXL and for scaled-down test models of
the same shape; the same block names give kohya's SDXL LoRA keys (export/kohya.py).
"""

from __future__ import annotations

import torch

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for every block of a UNet2DConditionModel config."""
    lpb = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = []
    for i, kind in enumerate(down):
        for j in range(lpb):
            idx = (lpb + 1) * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1."))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."))
    for i, kind in enumerate(up):
        for j in range(lpb + 1):
            idx = (lpb + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1."))
        if i < len(up) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(lpb + 1) * i + lpb}.{slot}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


def unet_module_to_original(name: str, prefix_map: list[tuple[str, str]]) -> str:
    """A diffusers UNet module path (no trailing parameter name) → its original-layout path."""
    for hf, sd in UNET_TOP.items():
        if name == hf or name.startswith(hf + "."):
            return sd + name[len(hf):]
    for hf, sd in prefix_map:
        if (name + ".").startswith(hf):
            rest = name[len(hf):]
            if ".resnets." in hf:
                head, _, tail = rest.partition(".")
                rest = RESNET_PARTS.get(head, head) + ("." + tail if tail else "")
            return (sd + rest).rstrip(".")
    raise KeyError(f"no original-layout name for UNet module {name}")


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    pm = unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out["model.diffusion_model." + unet_module_to_original(module, pm) + "." + param] = value
    return out


def vae_to_original(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    pairs = [("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
             ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.") for i in range(2)]
    for i in range(n_blocks):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n_blocks - 1 - i}.block.{j}.") for j in range(3)]
        if i < n_blocks - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n_blocks - 1 - i}.upsample."))
    inner = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "group_norm": "norm", "to_q": "q",
             "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in pairs:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        for hf, sd in inner.items():
            new = new.replace(f".{hf}.", f".{sd}.") if f".{hf}." in new else new
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # original VAE attention uses 1x1 convs
        out["first_stage_model." + new] = value
    return out


def clip_l_to_original(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers' CLIPTextModel (no `text_model.` level in v5) → `cond_stage_model.transformer.text_model.*`."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        out[f"{prefix}text_model.{key}"] = value
    return out


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model → OpenCLIP layout (SDXL's second text encoder, SD 2.x's encoder).

    OpenCLIP fuses q/k/v into one `in_proj` and multiplies by `text_projection` (so it is the transpose
    of the transformers Linear weight); a model without a projection (SD 2.x's CLIPTextModel) writes none.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    out = {
        f"{prefix}token_embedding.weight": state["embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": state["embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": state["final_layer_norm.weight"],
        f"{prefix}ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state["text_projection.weight"].T
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n_layers):
        hf, oc = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{p}"] = torch.cat([state[f"{hf}self_attn.{q}_proj.{p}"] for q in "qkv"])
            for a, b in parts.items():
                out[f"{oc}{b}.{p}"] = state[f"{hf}{a}.{p}"]
    return out


def is_sd2_pipeline(pipe) -> bool:
    """SD 2.x: one text encoder and linear projections in the UNet's transformer blocks (SD1.x: 1x1 convs)."""
    return getattr(pipe, "text_encoder_2", None) is None and bool(pipe.unet.config.get("use_linear_projection"))


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """An SD1.x, SD2.x or SDXL pipeline as one original-layout state dict (what `v1-5-pruned.safetensors`,
    `v2-1_768-ema-pruned.safetensors` or `sd_xl_base_1.0.safetensors` holds): each family's text encoder in
    its own layout (CLIP-L for SD1.x, OpenCLIP under `cond_stage_model.model.` for SD2.x, both for SDXL)."""
    state = unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config))
    state.update(vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    te = {k: v for k, v in pipe.text_encoder.state_dict().items() if "position_ids" not in k}
    te2 = getattr(pipe, "text_encoder_2", None)
    if is_sd2_pipeline(pipe):
        state.update(open_clip_to_original(te, "cond_stage_model.model."))
    elif te2 is None:
        state.update(clip_l_to_original(te))
    else:
        state.update(clip_l_to_original(te, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_original(te2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in state.items()}
