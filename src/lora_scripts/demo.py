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

from lora_scripts.config import load_config
from lora_scripts.data.text import load_samples
from lora_scripts.llm_generate import generate_replies
from lora_scripts.preflight import run_preflight
from lora_scripts.style import style_score
from lora_scripts.train.llm import train_llm

DEFAULT_CONFIG = Path("configs/examples/demo_llm_style.yaml")


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
    for i in range(min(3, len(prompts))):
        print("\n" + _side_by_side(prompts[i], base_replies[i].text, tuned_replies[i].text))
    print(
        f"\nheld-out eval loss: base {base_loss:.3f} -> tuned {tuned_loss:.3f} "
        f"({summary['eval_loss_drop']:.0%} lower)\n"
        f"house-style adherence on {len(prompts)} held-out prompts: base {summary['style_score_base']:.0%}, "
        f"tuned {summary['style_score_tuned']:.0%}\n"
        f"stopped on their own (EOS) within {cfg.max_new_tokens} tokens: base {summary['stopped_base']:.0%}, "
        f"tuned {summary['stopped_tuned']:.0%}\n"
        f"adapter: {result.adapter_dir}/adapter_model.safetensors; loss curve: {result.output_dir}/loss_curve.png"
    )
    out = Path(cfg.output_dir)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "demo_replies.md", "w", encoding="utf-8") as fh:
        for b, t in zip(base_replies, tuned_replies):
            fh.write(f"## {b.prompt}\n\n### base\n{b.text}\n\n### tuned\n{t.text}\n\n")
    return 0
