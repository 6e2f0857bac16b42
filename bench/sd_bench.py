"""One SD LoRA training run, as a subprocess of bench/run.py: ours, a loop written like diffusers'
train_text_to_image_lora.py ("example"), or a kohya-style cached loop ("kohya").

Model: SD1.5's full architecture (or, as a quick profile, every width quartered), random weights, batch 4,
LoRA r=8 (fp32) on to_q/to_k/to_v/to_out.0, AdamW, in the precision bench/run.py chose for the machine: under
bf16/fp16 autocast the frozen weights are cast to that dtype (the example and kohya cast the whole UNet, ours its
linear and conv layers); in fp32 nothing is cast. The example encodes every image with the VAE and every
caption with the text encoder at every step; the kohya-style loop, like ours, encodes each image and caption
once before training and then runs the UNet step alone. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS_SKIPPED = 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync() -> None:
    if DEVICE == "cuda":  # GPU work is asynchronous: a step is over when the device says so
        torch.cuda.synchronize()


def build_mid_sd(folder: Path) -> Path:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_scripts.models.sd_configs import TOKENIZERS, write_config_folder

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(80, 160, 320, 320), layers_per_block=2, cross_attention_dim=192, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=16, sample_size=32)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=16)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3,
                                      vocab_size=49408, max_position_embeddings=77, projection_dim=192))
    write_config_folder({}, TOKENIZERS["sd15"], folder / "tok")
    return save_sd_pipeline(folder, unet, vae, te, CLIPTokenizer.from_pretrained(folder / "tok" / "tokenizer"))


def save_sd_pipeline(folder: Path, unet, vae, te, tok) -> Path:
    """Save the parts as a diffusers SD1.5 folder, with SD1.5's noise schedule as it ships (no deprecation noise)."""
    import diffusers

    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_full_sd15(folder: Path) -> Path:
    """SD1.5's exact architecture (UNet 860M, VAE, CLIP-L) with random weights, from the shipped configs."""
    import json

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_scripts.models.sd_configs import config_folder

    if (folder / "model_index.json").exists():
        return folder
    src = config_folder("sd15")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(json.loads((src / "unet/config.json").read_text()))
    vae = diffusers.AutoencoderKL.from_config(json.loads((src / "vae/config.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder"))
    return save_sd_pipeline(folder, unet, vae, te, CLIPTokenizer.from_pretrained(src / "tokenizer"))


def autocast(precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=DTYPES[precision])


def run_ours(model_dir: str, data_dir: str, steps: int, out: str, resolution: int, precision: str) -> dict:
    from lora_scripts.config_file import load_config
    from lora_scripts.train.sd import train_sd

    cfg = load_config(None, [
        f"base_model={model_dir}", "model_type=sd15", f"train_data_dir={data_dir}", f"output_dir={out}",
        f"resolution={resolution}", "batch_size=4", f"max_train_steps={steps}", "learning_rate=1e-4", f"mixed_precision={precision}",
        "lora_rank=8", "lora_alpha=8", "repeats=10", "save_steps=100000", "sample_every_n_epochs=null",
    ])
    t0 = time.perf_counter()
    result = train_sd(cfg, progress=False)
    total = time.perf_counter() - t0
    steps_ev = [e for e in result.events if e["event"] == "step"][STEPS_SKIPPED:]
    cache = next(e["message"] for e in result.events if "latent cache" in e.get("message", ""))
    return {"images": sum(e["images"] for e in steps_ev), "seconds": sum(e["seconds"] for e in steps_ev),
            "step_seconds": [e["seconds"] for e in steps_ev], "final_loss": sum(e["loss"] for e in steps_ev[-4:]) / 4,
            "cache": cache, "wall_seconds": total}


def load_baseline_model(model_dir: str, precision: str):
    """The pipeline as both baselines set it up: frozen weights in the training dtype, a fp32 LoRA on the UNet."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    diffusers.utils.logging.set_verbosity_error()  # the casts below warn, in the example too
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).to(DEVICE)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.to(dtype=DTYPES[precision])
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    # The example leaves the adapter bf16 under bf16 and upcasts it for fp16; fp32 here, the precision of ours.
    cast_training_params(pipe.unet, dtype=torch.float32)
    return pipe


def square_pixels(path: Path, resolution: int) -> torch.Tensor:
    """The example's image transform: short side to the resolution, centre crop, to [-1, 1]."""
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    r = resolution
    s = r / min(img.size)
    img = img.resize((max(r, round(img.width * s)), max(r, round(img.height * s))), Image.Resampling.BILINEAR)
    left, top = (img.width - r) // 2, (img.height - r) // 2
    arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)


def encode(pipe, paths: list[Path], captions: list[str], resolution: int, precision: str):
    """Latents and text-encoder hidden states of a batch, without gradients."""
    dtype = DTYPES[precision]
    pixels = torch.stack([square_pixels(p, resolution) for p in paths]).to(DEVICE, dtype=dtype)
    with torch.no_grad(), autocast(precision):
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(DEVICE)
        hidden = pipe.text_encoder(ids)[0]
    return latents, hidden


def unet_step(pipe, noise_sched, params, opt, latents, hidden, precision: str) -> float:
    """The UNet step both baselines share with the example: noise at a random timestep, MSE on the noise."""
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(latents),), device=DEVICE)
    with autocast(precision):
        pred = pipe.unet(noise_sched.add_noise(latents, noise, t), t, hidden).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def run_baseline(model_dir: str, data_dir: str, steps: int, out: str, resolution: int, precision: str,
                 cached: bool = False) -> dict:
    """The example's loop (encode every step), or with `cached` the kohya-style one: every latent and text
    embedding computed once up front, the VAE and text encoder then moved off the device (kohya's
    --cache_latents / --cache_text_encoder_outputs), and the timed steps the UNet step alone."""
    from diffusers import DDPMScheduler

    from lora_scripts.data.images import load_captioned_images

    pipe = load_baseline_model(model_dir, precision)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    items = load_captioned_images(Path(data_dir))
    torch.manual_seed(0)
    cache, t_cache = None, time.perf_counter()
    if cached:
        pairs = [encode(pipe, [it.path], [it.caption], resolution, precision) for it in items]
        cache = [(lat[0], hid[0]) for lat, hid in pairs]
        pipe.vae.to("cpu")
        pipe.text_encoder.to("cpu")
    t_cache = time.perf_counter() - t_cache
    times, losses = [], []
    pipe.unet.train()
    for step in range(steps):
        batch = [(step * 4 + i) % len(items) for i in range(4)]
        t0 = time.perf_counter()
        if cache is not None:
            latents = torch.stack([cache[i][0] for i in batch])
            hidden = torch.stack([cache[i][1] for i in batch])
        else:
            latents, hidden = encode(pipe, [items[i].path for i in batch], [items[i].caption for i in batch],
                                     resolution, precision)
        losses.append(unet_step(pipe, noise_sched, params, opt, latents, hidden, precision))
        sync()
        times.append(time.perf_counter() - t0)
    k = STEPS_SKIPPED
    how = f"{len(items)} latents + captions encoded up front in {t_cache:.1f}s" if cached else "none (encodes every step)"
    return {"images": 4 * (steps - k), "seconds": sum(times[k:]), "step_seconds": times[k:],
            "final_loss": sum(losses[-4:]) / 4, "cache": how}


def step_flops(model_dir: str, resolution: int, batch: int = 4) -> dict:
    """FLOPs of one training step, counted by torch's FlopCounterMode on the meta device (shapes only): the
    UNet's forward and backward with the LoRA (every side), and the VAE encode + text encoder forward the
    example adds to each of its steps. For an honest MFU: FLOPs done per second / the matmul peak."""
    import diffusers
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(model_dir)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(json.loads((folder / "unet/config.json").read_text()))
        vae = diffusers.AutoencoderKL.from_config(json.loads((folder / "vae/config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        lat = resolution // 8
        x, t = torch.randn(batch, 4, lat, lat), torch.randint(0, 1000, (batch,))
        cond = torch.randn(batch, 77, unet.config.cross_attention_dim)
        counted = {}
        with FlopCounterMode(display=False) as fc:
            unet(x, t, cond).sample.float().pow(2).mean().backward()
        counted["unet_step"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            vae.encode(torch.randn(batch, 3, resolution, resolution))
            te(torch.zeros(batch, 77, dtype=torch.long))
        counted["encoders"] = fc.get_total_flops()
    return counted


RUNNERS = {"ours": run_ours, "example": run_baseline,
           "kohya": lambda *a: run_baseline(*a, cached=True)}


if __name__ == "__main__":
    which, model_dir, data_dir, steps, out, resolution, precision = sys.argv[1:8]
    res = RUNNERS[which](model_dir, data_dir, int(steps), out, int(resolution), precision)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if DEVICE == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))
