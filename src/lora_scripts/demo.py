"""`lora-scripts demo`: teach the embedded SmolLM2 the Harbor Help house style, then show what changed.

Trains with configs/examples/demo_llm_style.yaml (120 pairs, 30 held out), then answers every held-out
prompt with the base model and with the tuned one, prints three side by side, and reports the held-out
eval loss, the style-adherence score (lora_scripts.style) and how often each model stopped on its own.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from lora_scripts.config_file import load_config
from lora_scripts.data.text import load_samples
from lora_scripts.llm_generate import generate_replies
from lora_scripts.preflight import run_preflight
from lora_scripts.style import style_score
from lora_scripts.train.drift import DRIFT_FACTOR
from lora_scripts.train.llm import train_llm

DEFAULT_CONFIG = Path("configs/examples/demo_llm_style.yaml")
IMAGE_CONFIG = Path("configs/examples/demo_sd_tiny.yaml")


def _side_by_side(prompt: str, left: str, right: str, width: int = 58) -> str:
    def wrap(text: str) -> list[str]:
        out = []
        for para in text.splitlines() or [""]:
            out += textwrap.wrap(para, width) or [""]
        return out

    a, b = wrap(left), wrap(right)
    rows = [f"PROMPT: {prompt}", f"{'BASE MODEL':<{width}} | TUNED (LoRA)", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else ''):<{width}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


def run_demo(config: str | None = None, overrides: list[str] | None = None) -> int:
    from peft import PeftModel

    from lora_scripts.models.llm import load_llm

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    report = run_preflight(cfg)
    print(report.render(), file=sys.stderr)
    if not report.ok:
        return 2
    result = train_llm(cfg.model_copy(update={"model_type": "llm"}))

    held = load_samples(Path(cfg.eval_data_path)) if cfg.eval_data_path else []
    prompts = [s.messages[-2]["content"] for s in held if s.messages]
    base, tokenizer = load_llm(cfg.base_model)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    print(f"answering {len(prompts)} held-out prompts with the base and the tuned model...", file=sys.stderr)
    with model.disable_adapter():
        base_replies = generate_replies(model, tokenizer, prompts, cfg.max_new_tokens)
    tuned_replies = generate_replies(model, tokenizer, prompts, cfg.max_new_tokens)

    base_loss, tuned_loss = result.eval_losses[0][1], result.eval_losses[-1][1]
    summary = {
        "steps": result.steps,
        "eval_loss_base": round(base_loss, 4),
        "eval_loss_tuned": round(tuned_loss, 4),
        "eval_loss_drop": round(1 - tuned_loss / base_loss, 4),
        "style_score_base": style_score([r.text for r in base_replies]),
        "style_score_tuned": style_score([r.text for r in tuned_replies]),
        "stopped_base": sum(r.stopped for r in base_replies) / len(prompts),
        "stopped_tuned": sum(r.stopped for r in tuned_replies) / len(prompts),
        "held_out_prompts": len(prompts),
    }
    retention = [e for e in result.events if e["event"] == "eval" and "retention" in e]
    drift_line = ""
    if retention:  # the drift signal (train/drift.py): general answers of the base, the tuned model's loss on them
        summary["retention_base"], summary["retention_tuned"] = retention[0]["retention"], retention[-1]["retention"]
        drift_line = (f"retention on general questions (loss on the base's own answers, lower = closer): base "
                      f"{retention[0]['retention']:.3f} -> tuned {retention[-1]['retention']:.3f} "
                      f"({retention[-1]['retention'] / retention[0]['retention']:.2f}x; a run warns past "
                      f"{DRIFT_FACTOR}x)\n")
    for i in range(min(3, len(prompts))):
        print("\n" + _side_by_side(prompts[i], base_replies[i].text, tuned_replies[i].text))
    print(
        f"\nheld-out eval loss: base {base_loss:.3f} -> tuned {tuned_loss:.3f} "
        f"({summary['eval_loss_drop']:.0%} lower)\n"
        f"house-style adherence on {len(prompts)} held-out prompts: base {summary['style_score_base']:.0%}, "
        f"tuned {summary['style_score_tuned']:.0%}\n"
        f"stopped on their own (EOS) within {cfg.max_new_tokens} tokens: base {summary['stopped_base']:.0%}, "
        f"tuned {summary['stopped_tuned']:.0%}\n"
        f"{drift_line}"
        f"adapter: {result.adapter_dir}/adapter_model.safetensors; loss curve: {result.output_dir}/loss_curve.png"
    )
    out = Path(cfg.output_dir)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "demo_replies.md", "w", encoding="utf-8") as fh:
        for b, t in zip(base_replies, tuned_replies):
            fh.write(f"## {b.prompt}\n\n### base\n{b.text}\n\n### tuned\n{t.text}\n\n")
    return 0


def write_neon_images(folder: Path, n: int = 12, seed: int = 0) -> None:
    """Synthetic "neon night" pictures: dark gradients crossed by glowing pink and cyan bars, mixed sizes."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["filename,prompt"]
    subjects = ["a city street at night", "a narrow alley", "a skyline", "a rainy crossing"]
    for i in range(n):
        w, h = [(384, 256), (256, 384), (320, 320)][i % 3]
        base = np.linspace(10, 60, h)[:, None, None] * np.array([0.6, 0.3, 1.0])[None, None, :]
        img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8).copy())
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            colour = [(255, 40, 200), (40, 230, 255), (180, 60, 255)][int(rng.integers(0, 3))]
            draw.rectangle([x, y, x + int(rng.integers(8, 60)), y + int(rng.integers(4, 30))], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        img.save(folder / f"neon_{i:02d}.png")
        rows.append(f'neon_{i:02d}.png,"{subjects[i % 4]}, neon lights, pink and cyan glow, dark, rain"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")


def run_image_demo(config: str | None = None, overrides: list[str] | None = None) -> int:
    """Build the tiny SD1.5 model and the synthetic images once, then train and generate with the LoRA."""
    from lora_scripts.models.sd import build_tiny_sd, save_single_file
    from lora_scripts.sd_generate import describe_image, generate_images
    from lora_scripts.train.sd import train_sd

    cfg = load_config(config or IMAGE_CONFIG, overrides)
    ckpt, config_dir = Path(cfg.base_model).expanduser(), Path(cfg.model_config_dir).expanduser()
    if not ckpt.exists():
        save_single_file(build_tiny_sd("sd15", width=32), ckpt, config_dir)
    if not Path(cfg.train_data_dir).exists():
        write_neon_images(Path(cfg.train_data_dir))
    report = run_preflight(cfg)
    print(report.render(), file=sys.stderr)
    if not report.ok:
        return 2
    result = train_sd(cfg.model_copy(update={"model_type": report.model_type}))
    print(f"LoRA in {result.lora_file} (WebUI/ComfyUI: <lora:{cfg.name}:0.8>) and {result.diffusers_file} (diffusers)")
    written = generate_images(str(ckpt), report.model_type, [f"<lora:{cfg.name}:0.8>, neon_demo, a skyline"], [],
                              Path(cfg.output_dir) / "generated", Path(cfg.output_dir), config_dir, steps=10,
                              width=cfg.resolution, height=cfg.resolution)
    for path, prompt, loras in written:
        print(describe_image(path, prompt, loras))
    return 0
