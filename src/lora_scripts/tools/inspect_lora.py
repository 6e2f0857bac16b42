"""`lora-scripts inspect`: what a LoRA file is, what it adapts, and what other tools will make of it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lora_scripts.export.lora_files import LoraSet, read_lora


def describe(path: str | Path) -> tuple[str, LoraSet]:
    lora = read_lora(path)
    p = Path(path)
    files = [p] if p.is_file() else list(p.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    dtypes = Counter(str(m.down.dtype).replace("torch.", "") for m in lora.modules.values())
    groups = Counter(_group(n, lora.format) for n in lora.modules)
    pairs = Counter((m.rank, m.alpha) for m in lora.modules.values())
    lines = [
        f"file:     {p}  ({size / 1e6:.2f} MB, {', '.join(f'{d} x{c}' for d, c in dtypes.items())})",
        f"format:   {lora.format}" + {"kohya": " (A1111 / WebUI / ComfyUI keys)", "diffusers": " (diffusers load_lora_weights)",
                                       "peft": " (PeftModel.from_pretrained / load_adapter)"}[lora.format],
        f"family:   {lora.family}" + (f" (base: {lora.peft_config.get('base_model_name_or_path')})" if lora.peft_config else ""),
        f"modules:  {len(lora.modules)}  " + ", ".join(f"{g}: {c}" for g, c in sorted(groups.items())),
        "rank / alpha / effective scale (alpha/rank):",
    ]
    for (rank, alpha), count in sorted(pairs.items(), key=lambda x: -x[1]):
        scale = "1.0 (no alpha: readers use scale 1)" if alpha is None else f"{alpha / rank:g}"
        lines.append(f"  r={rank} alpha={alpha if alpha is not None else '-'} scale={scale}: {count} modules")
    meta = {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "sshs_"))}
    if meta:
        lines.append("training metadata:")
        for k in ("ss_output_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_num_train_images",
                  "ss_max_train_steps", "ss_learning_rate", "ss_resolution", "sshs_model_hash"):
            if k in meta:
                lines.append(f"  {k} = {meta[k]}")
        if "ss_tag_frequency" in meta:
            try:
                tags = Counter()
                for folder in json.loads(meta["ss_tag_frequency"]).values():
                    tags.update(folder)
                lines.append("  top tags: " + ", ".join(f"{t} ({c})" for t, c in tags.most_common(8)))
            except ValueError:
                pass
    if lora.peft_config:
        cfg = lora.peft_config
        lines.append(f"adapter_config: r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} "
                     f"targets={cfg.get('target_modules')} dora={cfg.get('use_dora')} rslora={cfg.get('use_rslora')}")
    warnings = check_compatibility(lora)
    lines += [f"warning:  {w}" for w in warnings] or ["warnings: none; loads in the tools of its format"]
    return "\n".join(lines), lora


def _group(name: str, fmt: str) -> str:
    if fmt == "peft":
        return name.rsplit(".", 1)[-1]
    if fmt == "diffusers":
        return name.split(".", 1)[0]
    return name.split("_")[0] + "_" + name.split("_")[1]


def check_compatibility(lora: LoraSet) -> list[str]:
    warns = []
    mods = lora.modules
    if any(m.alpha is None for m in mods.values()):
        warns.append("some modules have no alpha: A1111/ComfyUI use scale 1.0, which may not be what training used")
    if any(m.dora_scale is not None for m in mods.values()):
        warns.append("DoRA keys (dora_scale): ComfyUI applies them; diffusers' load_lora_weights drops them with "
                     "only a warning, so the result there differs")
    if lora.format == "kohya":
        bad_te = [n for n in mods if n.startswith(("lora_te_", "lora_te1_", "lora_te2_")) and "_text_model_" not in n]
        if bad_te:
            warns.append(f"{len(bad_te)} text-encoder keys lack 'text_model' (e.g. {bad_te[0]}): ComfyUI and A1111 "
                         "drop them ('lora key not loaded')")
        alphas = {m.alpha for m in mods.values()}
        if len(alphas) > 1:
            warns.append("alphas differ between modules: diffusers 0.42 applies the most common one to the attention "
                         "layers; the WebUIs and ComfyUI apply each exactly")
    return warns
