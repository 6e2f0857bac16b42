"""One SD LoRA training run, ours or a loop written like diffusers' train_text_to_image_lora.py.

Model: SD1.5's architecture at a quarter of every width but SD1.5's attention head sizes (40/80/160),
random weights, 256 px, batch 4, LoRA r=8 (fp32) on to_q/to_k/to_v/to_out.0, AdamW, bf16 autocast, frozen weights
in bf16 (the example casts its whole UNet, VAE and text encoder; ours its UNet's linear and conv layers). The baseline
encodes every image with the VAE and every caption with the text encoder at every step, as the example
does; ours reads cached latents and text embeddings. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS_SKIPPED = 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def run_ours(model_dir: str, data_dir: str, steps: int, out: str, resolution: int) -> dict:
    from lora_scripts.config import load_config
    from lora_scripts.train.sd import train_sd

    cfg = load_config(None, [
        f"base_model={model_dir}", "model_type=sd15", f"train_data_dir={data_dir}", f"output_dir={out}",
        f"resolution={resolution}", "batch_size=4", f"max_train_steps={steps}", "learning_rate=1e-4", "mixed_precision=bf16",
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


def run_baseline(model_dir: str, data_dir: str, steps: int, out: str, resolution: int) -> dict:
    import diffusers
    import numpy as np
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image

    from lora_scripts.data.images import load_captioned_images

    diffusers.utils.logging.set_verbosity_error()  # the casts below warn, in the example too
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).to(DEVICE)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):  # as the example: frozen weights in the mixed-precision dtype
        m.requires_grad_(False)
        m.to(dtype=torch.bfloat16)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    # The example leaves the adapter bf16 under bf16 and upcasts it for fp16; fp32 here, the precision of ours.
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    items = load_captioned_images(Path(data_dir))
    torch.manual_seed(0)

    def load(path):  # the example: resize the short side to the resolution, centre crop, normalise
        img = Image.open(path).convert("RGB")
        r = resolution
        s = r / min(img.size)
        img = img.resize((max(r, round(img.width * s)), max(r, round(img.height * s))), Image.Resampling.BILINEAR)
        left, top = (img.width - r) // 2, (img.height - r) // 2
        arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1)

    times, losses, images = [], [], 0
    unet.train()
    for step in range(steps):
        batch = [items[(step * 4 + i) % len(items)] for i in range(4)]
        t0 = time.perf_counter()
        pixels = torch.stack([load(it.path) for it in batch]).to(DEVICE, dtype=torch.bfloat16)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                ids = tok([it.caption for it in batch], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids.to(DEVICE)
                hidden = te(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (4,), device=DEVICE)
            pred = unet(noise_sched.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        images += 4
    k = STEPS_SKIPPED
    return {"images": 4 * (steps - k), "seconds": sum(times[k:]), "step_seconds": times[k:],
            "final_loss": float(np.mean(losses[-4:])), "cache": "none (encodes every step)"}


if __name__ == "__main__":
    which, model_dir, data_dir, steps, out, resolution = sys.argv[1:7]
    fn = run_ours if which == "ours" else run_baseline
    res = fn(model_dir, data_dir, int(steps), out, int(resolution))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if DEVICE == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))
