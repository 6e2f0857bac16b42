"""What a Stable Diffusion run will hold in memory, estimated before a single weight is loaded.

The model is built from its configs on torch's meta device (no weights, no time) and the parts are
counted: frozen weights in the dtype training keeps them in, the LoRA with its gradients and optimizer
state, and the activations one training step saves for its backward pass. Those are not guessed from a
formula: the UNet's forward runs once on fake tensors (torch's FakeTensorMode: shapes and dtypes, no
data, no arithmetic) under the run's autocast, and every tensor autograd saves is counted once per storage,
which is exactly what a real step keeps (checked against real steps in tests/test_memory.py). With
gradient checkpointing diffusers recomputes each resnet and transformer block in the backward pass: only
the blocks' inputs stay, plus the largest block's own activations while it is recomputed. Under mixed
precision the trace follows the CPU's autocast rules; CUDA's differ in a few ops (group norm stays fp32
there), so a GPU estimate can be somewhat low: scripts/gpu_check.py measures it beside the real peak.

The backward pass also needs room that nothing saves: the gradient flowing back through the largest
activations and the temporaries of the op at hand (attention scores, a conv's workspace).
`TRANSIENT_FACTOR` times the largest saved tensor covers it, measured on the CPU (tests/test_memory.py).

torch, diffusers and transformers are imported inside the functions: the preflight imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Backward-pass room beyond the saved activations, in units of the largest saved tensor: the incoming
# gradient, the outgoing one and the op's temporaries. Measured on tiny SD1.5/SDXL UNets at 128-256 px and
# SD1.5's full UNet at 256 px (CPU, fp32): 2-4 such tensors.
TRANSIENT_FACTOR = 4
# Optimizer state per trainable value (fp32 values): AdamW keeps two moments; 8-bit AdamW two bytes each
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16, "lion": 4, "sgd": 4}
GB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes by part; `on_device` parts stay on the training device during the steps, `offloaded` ones leave it
    after the caches are built (on a CPU both are the same memory)."""

    device: str
    on_device: dict[str, int]
    offloaded: dict[str, int]
    activations: int  # saved for the backward pass, without gradient checkpointing
    activations_checkpointed: int
    transient: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    def activation_bytes(self, checkpointing: bool | None = None) -> int:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return self.activations_checkpointed if ckpt else self.activations

    def step_bytes(self, checkpointing: bool | None = None) -> int:
        """What a training step adds on top of the resident weights and adapter state."""
        return self.activation_bytes(checkpointing) + self.transient

    def total(self, checkpointing: bool | None = None) -> int:
        """Peak on the training device during the steps (on a CPU: the offloaded parts too)."""
        resident = sum(self.on_device.values()) + (sum(self.offloaded.values()) if self.device == "cpu" else 0)
        return resident + self.step_bytes(checkpointing)

    def lines(self) -> list[str]:
        where = "GPU" if self.device == "cuda" else "RAM"
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.on_device.items())
        out = [f"memory estimate ({where}, GB): {parts}, activations {self.activation_bytes() / GB:.2f} "
               f"({'with' if self.checkpointing else 'without'} gradient checkpointing; "
               f"{self.activation_bytes(not self.checkpointing) / GB:.2f} {'without' if self.checkpointing else 'with'}), "
               f"backward room {self.transient / GB:.2f}: about {self.total() / GB:.1f} GB at the peak"]
        if self.offloaded:
            moved = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.offloaded.items())
            out.append(f"  after caching, off the GPU (in RAM, back only for sample images): {moved}"
                       if self.device == "cuda" else f"  of which needed only to build the caches and for sample images: {moved}")
        return out + [f"  {n}" for n in self.notes]

    def warning(self, available: int, knobs: list[str]) -> str | None:
        need = self.total()
        if need <= available:
            return None
        where = "GPU memory" if self.device == "cuda" else "free RAM"
        return (f"the run needs about {need / GB:.1f} GB but this machine has {available / GB:.1f} GB of {where}: "
                f"it will likely run out of memory. Turn: " + "; ".join(knobs))


def component_configs(base_model: str, model_type: str, config_dir: str | None) -> dict[str, dict]:
    """unet / vae / text_encoder(_2) config.json of the base model: its own folder's, or for a single file the
    shipped configs of its model type (what load_sd passes to from_single_file)."""
    from lora_scripts.models.sd_configs import config_folder

    path = Path(base_model)
    folder = path if path.is_dir() else Path(config_dir) if config_dir else config_folder(model_type)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if model_type == "sdxl" else [])
    return {n: json.loads((folder / n / "config.json").read_text()) for n in names}


def _meta_components(configs: dict[str, dict]):
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
        if "text_encoder_2" in configs:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    return unet, vae, encoders


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _to_fake(module, mode) -> None:
    """Every parameter and buffer of a meta-device module replaced by a fake CPU tensor of the same shape."""
    import torch

    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                             requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def checkpoint_units(unet) -> list:
    """The modules diffusers recomputes under gradient checkpointing: each block's resnets and attentions."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for b in blocks if b is not None for part in ("resnets", "attentions") for m in getattr(b, part, [])]


def trace_unet_step(unet, batch: int, latent_hw: tuple[int, int], precision: str, added_cond: dict | None):
    """Saved-for-backward bytes of one UNet forward (fake tensors): (all, largest single tensor, per checkpoint
    unit: (its own saved bytes, its input's bytes)). Parameters saved by autograd are not counted: they are
    resident anyway."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    _to_fake(unet, mode)
    weights = {t.untyped_storage()._cdata for t in [*unet.parameters(), *unet.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in weights:
            saved[key] = t.untyped_storage().nbytes()
        return t

    units, marks = checkpoint_units(unet), {}

    def before(m, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        marks[id(m)] = [sum(saved.values()), 0, x.numel() * x.element_size()]

    def after(m, args, kwargs, out):
        marks[id(m)][1] = sum(saved.values()) - marks[id(m)][0]

    hooks = [h for u in units for h in (u.register_forward_pre_hook(before, with_kwargs=True),
                                         u.register_forward_hook(after, with_kwargs=True))]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    h, w = latent_hw
    try:
        with mode:
            x = torch.randn(batch, unet.config.in_channels, h, w)
            t = torch.randint(0, 1000, (batch,))
            cond = torch.randn(batch, 77, unet.config.cross_attention_dim)
            extra = {k: torch.randn(batch, n) for k, n in (added_cond or {}).items()}
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = unet(x, t, cond, added_cond_kwargs=extra or None).sample
                torch.nn.functional.mse_loss(out.float(), x.float())
    finally:
        for hk in hooks:
            hk.remove()
    return sum(saved.values()), max(saved.values(), default=0), [(own, inp) for _, own, inp in marks.values()]


def estimate_sd_memory(cfg, model_type: str, device: str, precision: str, bucket: tuple[int, int],
                       n_captions: int) -> MemoryEstimate:
    """The estimate for `cfg` on `device` in `precision` ("no" | "bf16" | "fp16"), at the largest bucket."""
    from lora_scripts.models.sd import (
        _frozen_layers,
        adapter_targets,
        add_text_encoder_adapter,
        lora_config_for,
    )
    from lora_scripts.train.common import frozen_weights_dtype

    configs = component_configs(cfg.base_model, model_type, cfg.model_config_dir)
    unet, vae, encoders = _meta_components(configs)
    te_bytes = sum(_bytes(te) for te in encoders)  # the frozen encoders, before any LoRA
    unet_targets, te_targets = adapter_targets(cfg)
    trained = [unet]  # the adapters exactly as attach_adapters adds them, counted
    unet.requires_grad_(False)
    unet.add_adapter(lora_config_for(cfg, unet_targets))
    train_te = cfg.text_encoder_lr is not None
    if train_te:
        for te in encoders:
            te.requires_grad_(False)
            add_text_encoder_adapter(te, lora_config_for(cfg, te_targets))
        trained += encoders
    lora = sum(p.numel() for part in trained for p in part.parameters() if p.requires_grad)
    # store_frozen_layers_in keeps the frozen Linear/Conv2d weights and biases in this dtype (None: fp32)
    dtype = frozen_weights_dtype(cfg.model_copy(update={"mixed_precision": precision}))
    frozen = dtype.itemsize if dtype is not None else 4
    layers = sum(t.numel() for m in _frozen_layers(unet).values() for t in (m.weight, m.bias) if t is not None)
    unet_bytes = _bytes(unet) - 4 * layers + frozen * layers
    state = OPTIMIZER_STATE_BYTES.get(cfg.optimizer, 8)
    on_device = {"UNet weights": unet_bytes, "LoRA + gradients + optimizer state": lora * (4 + 4 + state)}
    offloaded = {}
    augment = cfg.shuffle_caption or cfg.caption_dropout_rate > 0
    (on_device if train_te or augment else offloaded)["text encoders"] = te_bytes
    (offloaded if cfg.cache_latents else on_device)["VAE"] = _bytes(vae)
    added = None
    if model_type == "sdxl":
        added = {"text_embeds": configs["text_encoder_2"]["projection_dim"], "time_ids": 6}
    w, h = bucket
    total, largest, units = trace_unet_step(unet, cfg.batch_size, (h // 8, w // 8), precision, added)
    inner = sum(own for own, _ in units)
    checkpointed = total - inner + sum(inp for _, inp in units) + max((own for own, _ in units), default=0)
    est = MemoryEstimate(device, on_device, offloaded, total, checkpointed, TRANSIENT_FACTOR * largest,
                         cfg.gradient_checkpointing)
    est.notes.append(f"latents and up to {n_captions} caption embeddings are cached on disk and read per step")
    return est


def device_memory(device: str) -> int:
    """What the run may use: a GPU's total memory, or the RAM free now on a CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    import psutil

    return psutil.virtual_memory().available


def memory_knobs(cfg, device: str) -> list[str]:
    """The settings that lower the peak, most effective first, leaving out those already turned."""
    knobs = []
    if not cfg.gradient_checkpointing:
        knobs.append("gradient_checkpointing: true (step memory 2.5-3x smaller, steps 20-30% slower; measured on the CPU)")
    if cfg.batch_size > 1:
        knobs.append(f"batch_size: {max(1, cfg.batch_size // 2)} with gradient_accumulation_steps: "
                     f"{cfg.gradient_accumulation_steps * 2} (the same effective batch)")
    if cfg.mixed_precision in ("no", "auto") and device == "cuda":
        knobs.append("mixed_precision: fp16 or bf16 (frozen weights and activations in half the bytes)")
    if cfg.resolution > 512:
        knobs.append(f"resolution: {cfg.resolution * 3 // 4 // 64 * 64} (activations scale with the pixels)")
    if not cfg.cache_latents:
        knobs.append("cache_latents: true (the VAE then leaves the GPU during the steps)")
    if cfg.text_encoder_lr is not None:
        knobs.append("text_encoder_lr: null (text encoders frozen, cached and off the GPU)")
    return knobs
