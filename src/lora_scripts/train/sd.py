"""LoRA training for Stable Diffusion (SD1.x, SD2.x, SDXL): one plain loop.

Per step: cached latents (or a fresh VAE encode) → noise at a random timestep → UNet prediction → MSE
against the noise (or v) target, optionally min-SNR weighted. All randomness of a step (noise, timesteps,
flips, caption shuffles) comes from a generator seeded by (seed, step), so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_scripts.config import ConfigError, TrainConfig
from lora_scripts.data import sd_data
from lora_scripts.data.buckets import batches_per_epoch, views_per_bucket
from lora_scripts.data.images import describe_repeats, load_image_sets, plan_repeats
from lora_scripts.export.kohya import kohya_lora_set, tag_frequency, training_metadata, write_kohya_file
from lora_scripts.export.lora_set import LoraSet
from lora_scripts.models.detect import detect_model_type
from lora_scripts.models.sd import (
    SDModel,
    adapter_targets,
    add_text_encoder_adapter,
    load_sd,
    lora_config_for,
    restore_frozen_layers,
    sdxl_time_ids,
    store_frozen_layers_in,
)
from lora_scripts.train.adalora import RankBudget
from lora_scripts.train.checkpoint import Position
from lora_scripts.train.common import (
    DTYPES,
    build_optimizer,
    build_scheduler,
    frozen_weights_dtype,
    lora_inputs_uncast,
    lora_param_groups,
)
from lora_scripts.train.events import Events, adapter_title, plot_loss_curve, whole_run
from lora_scripts.train.plan import plan_steps, share_batches
from lora_scripts.train.run import start_run
from lora_scripts.train.sd_caches import PromptEncoder, build_caches, unparked


@dataclass
class SDTrainResult:
    output_dir: Path
    lora_file: Path
    diffusers_file: Path
    steps: int
    final_loss: float | None
    events: list[dict] = field(default_factory=list)
    trained_model: SDModel | None = None  # as trained: after mixed precision its frozen UNet layers are bf16/fp16
    reload_unet: Callable[[], torch.nn.Module] | None = None  # the base UNet again, for the exact fp32 weights
    skipped_steps: int = 0  # updates not applied (fp16 overflows absorbed by loss scaling, NaN-guard skips)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), step 0 = base

    @property
    def model(self) -> SDModel | None:
        """The trained model with its fp32 UNet weights, for callers that go on using it in-process.

        Read back from the base model on first use when training kept the frozen layers in bf16/fp16: a run
        from the command line never pays for it (time, and the memory of a second model while it lasts).
        """
        if self.reload_unet is not None:
            restore_frozen_layers(self.trained_model.unet, self.reload_unet())
            self.reload_unet = None
        return self.trained_model


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def step_generators(cfg: TrainConfig, step: int, index: int) -> tuple[torch.Generator, random.Random]:
    """The generators of one micro-batch: noise and timesteps, flips and caption changes.

    Seeded by (seed, step, the micro-batch's place in the global batch: micro x processes + rank), so a
    resumed run repeats the uninterrupted one, and N processes draw what one process accumulating the same
    N micro-batches draws.
    """
    seed = (cfg.seed * 1_000_003 + step) * 1_009 + index
    return torch.Generator().manual_seed(seed), random.Random(seed)


def attach_adapters(cfg: TrainConfig, model: SDModel, run, total_steps: int
                    ) -> tuple[bool, torch.dtype | None, RankBudget | None]:
    """LoRA on the UNet (and the text encoders when text_encoder_lr is set), everything else frozen; peft's
    input casts off while the run lasts; frozen UNet layers in the training dtype. With lora_type adalora the
    UNet gets AdaLoRA, through peft's AdaLoraModel (its rank allocator comes with it; diffusers'
    add_adapter only injects layers). Returns (text encoders trained, the frozen layers' dtype or None,
    AdaLoRA's rank budget or None)."""
    unet = model.unet
    for part in [unet, model.vae, *model.text_encoders]:
        part.requires_grad_(False)
    unet_targets, te_targets = adapter_targets(cfg)
    budget = None
    if cfg.lora_type == "adalora":
        from peft.tuners.adalora import AdaLoraModel

        budget = RankBudget(AdaLoraModel(unet, lora_config_for(cfg, unet_targets, total_steps), "default"))
    else:
        try:
            unet.add_adapter(lora_config_for(cfg, unet_targets))
        except ValueError as exc:
            if "Unknown initialization" not in str(exc):
                raise
            raise ConfigError(f"lora_init: {cfg.lora_init} decomposes linear layers, and target_modules reach a "
                              "convolution of this UNet (SD1.5's all-linear includes its 1x1 proj_in/proj_out "
                              "convolutions); name linear targets, or use lora_init: default") from None
    train_te = cfg.text_encoder_lr is not None
    if train_te:
        for te in model.text_encoders:
            add_text_encoder_adapter(te, lora_config_for(cfg, te_targets))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for part in [unet, *(model.text_encoders if train_te else [])]:
        run.during(lora_inputs_uncast(part, cfg.mixed_precision))
    frozen_dtype = frozen_weights_dtype(cfg)
    if frozen_dtype is not None:
        store_frozen_layers_in(unet, frozen_dtype)
    return train_te, frozen_dtype, budget


def exporter(cfg: TrainConfig, model: SDModel, model_type: str, train_te: bool, items,
             plan) -> tuple[Callable[[Path], tuple[Path, Path]], Callable[[], Path]]:
    """(`export(folder)`, `export_best()`): the kohya/A1111 file (with its ss_* metadata) and the diffusers
    file of the model as it stands, in save_precision, for every checkpoint and the final output; and the
    kohya file alone as `<name>-best.safetensors` (save_best).

    Made before a resume loads trained weights: a PiSSA/OLoRA run's adapters are kept here as they start, and
    the files then hold the update against the original weights (kohya_lora_set), the diffusers one made from
    the kohya set as `convert` makes it."""
    from lora_scripts.export.diffusers_lora import (
        diffusers_components,
        diffusers_components_of_model,
        write_diffusers_file,
    )

    dtype = DTYPES[cfg.save_precision]
    metadata = training_metadata(
        cfg, model_type, tag_frequency({str(cfg.train_data_dir): [it.caption or "" for it in items]}),
        len(items), plan.total_steps, plan.epochs, train_te,
        cfg.adalora_ranks[0] if cfg.lora_type == "adalora" else cfg.lora_rank)

    text_encoders = model.text_encoders if train_te else []
    start = kohya_lora_set(model.unet, text_encoders, model_type).copy() if cfg.mutates_base else None

    def kohya_set() -> LoraSet:
        return kohya_lora_set(model.unet, text_encoders, model_type, metadata=metadata, start=start)

    def kohya_file(path: Path) -> Path:
        return write_kohya_file(kohya_set(), path, dtype)

    def export(folder: Path) -> tuple[Path, Path]:
        if start is None:
            layers = diffusers_components_of_model(model.unet, text_encoders, dtype)
        else:
            layers = {comp: ({k: t.to(dtype) for k, t in tensors.items()}, fields)
                      for comp, (tensors, fields) in diffusers_components(kohya_set(), cfg.model_config_dir).items()}
        return kohya_file(folder / f"{cfg.name}.safetensors"), write_diffusers_file(layers, folder, model_type)

    return export, lambda: kohya_file(Path(cfg.output_dir) / f"{cfg.name}-best.safetensors")


EVAL_TIMESTEPS = 4  # per held-out image, spread evenly over the schedule (125, 375, 625, 875 of 1000)


@dataclass
class DiffusionLoss:
    """The loss of one micro-batch: latents (cached, or encoded now) -> noise at a random timestep -> the
    UNet's prediction -> MSE against the noise (or v), optionally min-SNR weighted. Its randomness comes from
    step_generators(step, index), so it is the same for a resumed run and for any number of processes."""

    cfg: TrainConfig
    model: SDModel
    unet: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    noise_sched: object
    cache: sd_data.LatentCache | None
    conditioning: PromptEncoder
    accelerator: object

    def __call__(self, batch: list[sd_data.Sample], step: int, index: int) -> torch.Tensor:
        cfg, model, noise_sched, device = self.cfg, self.model, self.noise_sched, self.accelerator.device
        gen, rng = step_generators(cfg, step, index)
        flips = [cfg.flip_aug and rng.random() < 0.5 for _ in batch]
        if self.cache is not None:
            latents = torch.stack([self.cache.get(s, f) for s, f in zip(batch, flips)])
        else:
            latents = torch.stack([sd_data.encode_image(model.vae, s, f) for s, f in zip(batch, flips)])
        latents = latents.to(device)  # (B, 4, H/8, W/8)
        captions = [sd_data.augment_caption(s.item.caption or "", rng, cfg.shuffle_caption, cfg.keep_tokens
                                            + (1 if cfg.trigger_word else 0), cfg.caption_dropout_rate)
                    for s in batch]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(batch),), generator=gen).to(device)
        pred, target = self.predict(batch, latents, noise, t, captions)
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma:
            loss = loss * snr_weights(noise_sched, t, cfg.min_snr_gamma, model.prediction_type)
        return loss.mean()

    def predict(self, batch: list[sd_data.Sample], latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the UNet's prediction, what it should predict: the noise, or v), in fp32, for `latents` noised
        with `noise` at timesteps `t` and conditioned on `captions` (SDXL: and on `batch`'s sizes)."""
        model, noise_sched, device = self.model, self.noise_sched, self.accelerator.device
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise_sched.get_velocity(latents, noise, t) if model.prediction_type == "v_prediction" else noise
        with self.accelerator.autocast():
            hidden, pooled = self.conditioning(captions)
            extra = {}
            if model.model_type == "sdxl":
                extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch).to(device)}}
            pred = self.unet(noisy, t, hidden, **extra).sample
        return pred.float(), target.float()

    @torch.no_grad()
    def held_out(self, samples: list[sd_data.Sample]) -> float:
        """The eval loss: each held-out image at EVAL_TIMESTEPS fixed timesteps with noise drawn from `seed`
        alone, its caption as written (no flip, dropout, shuffle or noise offset), unweighted MSE. The same
        noise every time, so the curve compares epochs, not noise draws. Run on every process (DDP's forward
        may broadcast buffers)."""
        model, device = self.model, self.accelerator.device
        gen = torch.Generator().manual_seed(self.cfg.seed + 2_718_281)
        span = self.noise_sched.config.num_train_timesteps
        t = torch.tensor([int((k + 0.5) * span / EVAL_TIMESTEPS) for k in range(EVAL_TIMESTEPS)], device=device)
        was_training = self.unet.training
        self.unet.eval()
        total = 0.0
        for s in samples:
            one = self.cache.get(s, False) if self.cache is not None else sd_data.encode_image(model.vae, s, False)
            latents = one.unsqueeze(0).expand(EVAL_TIMESTEPS, *one.shape).to(device)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            pred, target = self.predict([s] * EVAL_TIMESTEPS, latents, noise, t, [s.item.caption or ""] * EVAL_TIMESTEPS)
            total += float(F.mse_loss(pred, target))
        self.unet.train(was_training)
        return total / max(len(samples), 1)


def train_sd(cfg: TrainConfig, callback=None, progress: bool = True) -> SDTrainResult:
    from diffusers import DDPMScheduler

    with start_run(cfg, "sd", callback, progress) as run:  # mixed_precision: auto resolved for this machine
        cfg, accelerator, events, out_dir = run.cfg, run.accelerator, run.events, run.out_dir
        rank, world = accelerator.process_index, accelerator.num_processes
        model_type = cfg.model_type or detect_model_type(cfg.base_model)

        # ---- data -----------------------------------------------------------------------------------
        items, eval_items = load_image_sets(Path(cfg.train_data_dir), cfg.metadata_path, cfg.trigger_word,
                                            cfg.eval_data_path, cfg.val_ratio, cfg.seed)
        samples, table = sd_data.build_samples(items, cfg.resolution)
        eval_samples = sd_data.build_samples(eval_items, cfg.resolution)[0]
        repeats = plan_repeats(items, cfg.repeats)
        events.emit("info", message="buckets (width x height: images): "
                    + ", ".join(f"{w}x{h}: {n}" for (w, h), n in table.items()))
        events.emit("info", message=describe_repeats(items, repeats))

        # ---- model and adapters ------------------------------------------------------------------------
        model = load_sd(cfg.base_model, model_type, cfg.model_config_dir, cfg.v_parameterization)
        unet, vae = model.unet, model.vae
        vae.to(accelerator.device, dtype=torch.float32)  # fp16 VAEs overflow to NaN; encoding is cached anyway
        views = views_per_bucket([s.bucket for s in samples], repeats)
        plan = plan_steps(sum(repeats), cfg, world, batches_per_epoch(views, cfg.batch_size))
        total_steps = plan.total_steps
        train_te, frozen_dtype, budget = attach_adapters(cfg, model, run, total_steps)
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        te_params = [p for te in model.text_encoders for p in te.parameters() if p.requires_grad]
        groups = lora_param_groups([(n, p) for n, p in unet.named_parameters() if p.requires_grad],
                                   cfg.learning_rate, cfg.loraplus_lr_ratio)
        if te_params:
            groups += lora_param_groups([(n, p) for te in model.text_encoders for n, p in te.named_parameters()
                                         if p.requires_grad], cfg.text_encoder_lr, cfg.loraplus_lr_ratio)
        optimizer = build_optimizer(cfg, groups)
        lr_sched = build_scheduler(cfg, optimizer, total_steps)
        noise_sched = DDPMScheduler.from_config(model.pipe.scheduler.config, prediction_type=model.prediction_type)
        unet.to(accelerator.device)
        for te in model.text_encoders:
            te.to(accelerator.device)
        # The trained parts go through accelerate: wrapped for DDP under several processes (gradients averaged
        # across ranks), their forward under autocast. `unet` and `model` keep the plain modules for export.
        trained = [unet, *(model.text_encoders if train_te else [])]
        *wrapped, optimizer, lr_sched = accelerator.prepare(*trained, optimizer, lr_sched)
        unet_train, te_train = wrapped[0], wrapped[1:] or None

        # one module holding every trainable part, so a checkpoint stores them under stable names
        holder = torch.nn.ModuleDict({"unet": unet, **{f"te{i}": te for i, te in enumerate(model.text_encoders)}})
        export, export_best = exporter(cfg, model, model_type, train_te, items, plan)  # before a resume: see there
        run.track(wrapped, holder, unet_params + te_params, optimizer, lr_sched, total_steps, export, export_best,
                  hooks=[budget] if budget else [])
        pos = run.resume([[s.item.key, s.image_hash, s.item.caption, r] for s, r in zip(samples, repeats)])

        # ---- caches ----------------------------------------------------------------------------------------
        cache, conditioning, parked = build_caches(cfg, model, samples, eval_samples, te_train, events,
                                                   accelerator.device)

        events.emit("start", step=pos.step, total_steps=total_steps, epochs=plan.epochs,
                    steps_per_epoch=plan.steps_per_epoch, images=len(items), views_per_epoch=sum(repeats),
                    buckets={f"{w}x{h}": n for (w, h), n in table.items()},
                    trainable_params=sum(p.numel() for p in unet_params + te_params), model_type=model_type,
                    prediction_type=model.prediction_type, processes=world, precision=cfg.mixed_precision)
        run.save_config()

        loss_of = DiffusionLoss(cfg, model, unet_train, noise_sched, cache, conditioning, accelerator)
        if pos.step == 0 and eval_samples:
            run.record_eval(pos, loss_of.held_out(eval_samples))  # the base model's: the reference

        # ---- the loop --------------------------------------------------------------------------------------
        events.start_progress(total_steps, pos.step, desc=f"training {cfg.name}")
        unet_train.train()
        run.begin_steps()
        while pos.step < total_steps:
            batches = sd_data.epoch_batches(samples, repeats, cfg.batch_size, cfg.seed, pos.epoch)
            mine = share_batches(batches, plan.batches_per_rank, world, rank)
            acc = cfg.gradient_accumulation_steps
            step_groups = [mine[i : i + acc] for i in range(0, len(mine), acc)]
            for group in step_groups[pos.group :]:
                group_loss = torch.zeros((), device=accelerator.device)
                views = 0
                for micro, indices in enumerate(group):
                    with run.micro_batch(last=micro == len(group) - 1):
                        loss = loss_of([samples[i] for i in indices], pos.step, micro * world + rank)
                        run.backward((loss + budget.penalty()) if budget else loss, len(group))
                    group_loss += loss.detach() / len(group)
                    views += len(indices)
                run.step(pos, group_loss, {"images": views}, rate="images")
                if pos.step >= total_steps:
                    break
            if pos.group >= len(step_groups):
                if eval_samples:
                    run.record_eval(pos, loss_of.held_out(eval_samples))
                if run.samples_due(pos):
                    with unparked(parked, accelerator.device):
                        write_sample_grid(model, cfg, pos, events, out_dir, accelerator)
                run.next_epoch(pos)

        # ---- export ------------------------------------------------------------------------------------------
        if eval_samples and run.last_eval_step != pos.step:
            run.record_eval(pos, loss_of.held_out(eval_samples))  # max_train_steps ended mid-epoch
        run.checkpoint(pos)
        lora_file, diffusers_file = out_dir / f"{cfg.name}.safetensors", out_dir / "pytorch_lora_weights.safetensors"
        for part in wrapped:  # accelerate's autocast wrapper off: the caller gets the plain modules
            accelerator.unwrap_model(part, keep_fp32_wrapper=False)
        if accelerator.is_main_process:
            export(out_dir)
            with unparked(parked, accelerator.device):
                write_sample_grid(model, cfg, pos, events, out_dir, accelerator)
            plot_loss_curve(whole_run(out_dir / "events.jsonl"), out_dir / "loss_curve.png", f"{cfg.name}: {adapter_title(cfg)}")
            if budget:
                events.emit("info", message=budget.summary())
            events.emit("end", step=pos.step, final_loss=run.last_loss, skipped_steps=run.skipped_steps,
                        precision=cfg.mixed_precision, lora=str(lora_file), **run.best_summary())
        accelerator.wait_for_everyone()

        def reload_unet():  # the exact fp32 UNet, for SDTrainResult.model
            return load_sd(cfg.base_model, model_type, cfg.model_config_dir, cfg.v_parameterization).unet

        return SDTrainResult(out_dir, lora_file, diffusers_file, pos.step, run.last_loss, events.history, model,
                             reload_unet if frozen_dtype is not None else None, run.skipped_steps, run.eval_losses)


@torch.no_grad()
def write_sample_grid(model: SDModel, cfg: TrainConfig, pos: Position, events: Events, out_dir: Path,
                      accelerator) -> Path | None:
    """The sample prompts rendered with a fixed seed, side by side, as samples/step_XXXXXX.png."""
    if not cfg.sample_prompts or not accelerator.is_main_process:
        return None
    from lora_scripts.sd_generate import image_grid, render

    was_training = model.unet.training
    model.unet.eval()
    with accelerator.autocast():  # in the training precision: the frozen UNet layers may be bf16/fp16
        images = render(model, cfg.sample_prompts, negative=cfg.sample_negative_prompt, steps=cfg.sample_steps,
                        guidance=cfg.sample_guidance, seed=cfg.seed, size=(cfg.resolution, cfg.resolution))
    model.unet.train(was_training)
    grid = image_grid(images, cfg.sample_prompts)
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{pos.step:06d}.png"
    grid.save(path)
    import numpy as np

    events.emit("image", step=pos.step, tag="samples", image=np.asarray(grid), path=str(path))
    events.emit("info", message=f"samples written to {path}")
    return path
