"""Stable Diffusion sampling: prompts → images, LoRAs at chosen strengths, the WebUI `<lora:name:w>` syntax."""

from __future__ import annotations

import re
from pathlib import Path, PureWindowsPath

import torch
from PIL import Image, ImageDraw

from lora_scripts.safety import check_safetensors

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?\d*\.?\d+))?>")


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Strip `<lora:name:0.8>` tags from a prompt; returns the clean prompt and (name, weight) pairs."""
    tags = [(m.group(1), float(m.group(2)) if m.group(2) else 1.0) for m in LORA_TAG.finditer(prompt)]
    clean = " ".join(LORA_TAG.sub("", prompt).split()).strip(" ,")
    return clean, tags


class LoraTagError(ValueError):
    pass


def resolve_lora_name(name: str, lora_dir: Path) -> Path:
    """`name` → `<lora_dir>/<name>.safetensors` (sub-folders allowed), or a file whose ss_output_name is
    `name`. A prompt may come from anyone (a shared prompt list, a web form): its tags never reach outside
    `lora_dir`, so an absolute name or a `..` step is refused."""
    parts = Path(name).parts
    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise LoraTagError(f"<lora:{name}>: LoRA names are looked up inside --lora-dir {lora_dir}; absolute paths and "
                           "'..' are not allowed (copy the file into that folder, or pass it with --lora PATH)")
    direct = Path(lora_dir) / f"{name}.safetensors"
    if direct.exists():
        return direct
    from safetensors import safe_open

    for f in sorted(Path(lora_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            if (fh.metadata() or {}).get("ss_output_name") == name:
                return f
    raise FileNotFoundError(f"<lora:{name}>: no {name}.safetensors (or file with ss_output_name={name}) in {lora_dir}")


def apply_loras(pipe, loras: list[tuple[Path, float]]) -> None:
    """Load each LoRA file as its own adapter and activate them at their strengths."""
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        check_safetensors(path)
        name = f"lora{i}"
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=name)
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)


@torch.no_grad()
def render(model, prompts: list[str], negative: str = "", steps: int = 20, guidance: float = 7.0, seed: int = 0,
           size: tuple[int, int] = (512, 512)) -> list[Image.Image]:
    """One image per prompt, each from the same seed so samples over training are comparable."""
    pipe = model.pipe if hasattr(model, "pipe") else model
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        gen = torch.Generator().manual_seed(seed)
        out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gen, width=size[0], height=size[1], output_type="pil")
        images.append(out.images[0])
    return images


def image_grid(images: list[Image.Image], captions: list[str] | None = None) -> Image.Image:
    """Images side by side with their prompt (shortened) underneath."""
    w, h = images[0].size
    label = 14 if captions else 0
    grid = Image.new("RGB", (w * len(images), h + label), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        grid.paste(img, (i * w, 0))
        if captions:
            text = captions[i] if len(captions[i]) * 6 < w else captions[i][: max(1, w // 6 - 1)] + "…"
            draw.text((i * w + 2, h + 1), text, fill=(0, 0, 0))
    return grid


def describe_image(path: Path, prompt: str, loras: list[tuple[Path, float]]) -> str:
    """One line per generated image: the file, its prompt and the LoRAs it used, as `<file:weight>`."""
    return f"{path}: {prompt}" + "".join(f" <{p.name}:{w}>" for p, w in loras)


def generate_images(base: str, model_type: str, prompts: list[str], loras: list[tuple[Path, float]], out: Path,
                    lora_dir: Path = Path("."), model_config_dir: Path | None = None, negative: str = "",
                    steps: int = 25, guidance: float = 7.0, seed: int = 0, width: int | None = None,
                    height: int | None = None, v_parameterization: bool | None = None, same_seed: bool = False,
                    ) -> list[tuple[Path, str, list[tuple[Path, float]]]]:
    """One PNG per prompt in `out`, each with `loras` plus the prompt's own `<lora:name:w>` tags (looked up
    in `lora_dir`); prompt i uses seed + i (seed itself when `same_seed`). Returns (file, prompt without
    tags, LoRAs applied) per image. Raises FileNotFoundError for a tag that names no file in `lora_dir`."""
    from lora_scripts.models.sd import load_sd

    model = load_sd(base, model_type, model_config_dir, v_parameterization)
    native = model.pipe.unet.config.sample_size * 8
    size = (width or native, height or native)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, raw in enumerate(prompts):
        prompt, tags = parse_lora_tags(raw)
        applied = list(loras) + [(resolve_lora_name(name, lora_dir), w) for name, w in tags]
        model.pipe.unload_lora_weights()
        apply_loras(model.pipe, applied)
        image_seed = seed if same_seed else seed + i
        [image] = render(model, [prompt], negative=negative, steps=steps, guidance=guidance, seed=image_seed, size=size)
        path = out / f"{i:03d}_seed{image_seed}.png"
        image.save(path)
        written.append((path, prompt, applied))
    return written
