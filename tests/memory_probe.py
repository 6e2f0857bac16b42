"""Measures what the memory estimate predicts, in a fresh process: real UNet LoRA training steps.

Run by tests/test_memory.py: `python memory_probe.py '<json list of cases>'`, each with base (a folder with
unet/config.json, or "shipped" for the model type's shipped configs), model_type, resolution, batch and
checkpointing. Per case: the UNet with random weights, the LoRA the trainer adds (same config builder), one
small warm-up step (code pages, optimizer state), then a step at the given size. Prints, per case, the RSS
the weights took and the step's peak above them (VmHWM, reset before the step through /proc/self/clear_refs).
glibc's mmap threshold is fixed by the caller (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the
system and RSS follows the live tensors instead of the heap's high-water mark.
"""

import gc
import json
import sys
from pathlib import Path

import diffusers
import torch

from lora_scripts.config_file import load_config
from lora_scripts.models.sd import adapter_targets, lora_config_for
from lora_scripts.models.sd_configs import config_folder


def status_kb(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(case: dict) -> dict:
    folder = config_folder(case["model_type"]) if case["base"] == "shipped" else Path(case["base"])
    cfg = load_config(None, [f"base_model={folder}", f"batch_size={case['batch']}",
                             f"gradient_checkpointing={case['checkpointing']}", "mixed_precision=no"])
    config = json.loads((folder / "unet/config.json").read_text())
    before_weights = status_kb("VmRSS")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu")
    for p in unet.parameters():  # touched, so resident (the values do not matter to the memory)
        p.data.fill_(0.01)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config_for(cfg, adapter_targets(cfg)[0]))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    weights = status_kb("VmRSS") - before_weights
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = case["batch"]

    def step(latent: int) -> None:
        x = torch.randn(batch, 4, latent, latent)
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}}
        out = unet(x, torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, config["cross_attention_dim"]), **extra)
        torch.nn.functional.mse_loss(out.sample, x).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(8)
    before_step = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step(case["resolution"] // 8)
    return {"weights": weights, "step": status_kb("VmHWM") - before_step}


results = []
for case in json.loads(sys.argv[1]):
    results.append(measure(case))
    gc.collect()
print("RESULT " + json.dumps(results))
