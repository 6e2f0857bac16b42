"""Reading LoRA files in their three common shapes (kohya/A1111, diffusers, PEFT folder) into one in-memory
form, `LoraSet` (export/lora_set.py), and writing PEFT folders; the kohya writer is export/kohya.py's
`write_kohya_file`. Used by training's exports and the LoRA tools alike.

Module names are kohya names (`lora_unet_...`) for Stable Diffusion and peft module paths
(`base_model.model.model.layers.0.self_attn.q_proj`) for LLMs; delta W = up @ down x scale (export/scale.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_scripts.export.kohya import write_kohya_file
from lora_scripts.export.lora_set import LoraModule, LoraSet
from lora_scripts.export.scale import file_alpha
from lora_scripts.safety import check_safetensors

LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "lokr_w2", "hada_t1", ".oft_", "lora_mid")


class LoraFormatError(ValueError):
    pass


__all__ = ["LoraFormatError", "LoraModule", "LoraSet", "read_lora", "write_kohya_file", "write_peft_folder"]


def read_lora(path: str | Path) -> LoraSet:
    """A kohya/A1111 file, a diffusers `pytorch_lora_weights.safetensors`, or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return _read_peft(path)
        for name in ("pytorch_lora_weights.safetensors",):
            if (path / name).exists():
                return read_lora(path / name)
        raise LoraFormatError(f"{path}: no adapter_config.json (PEFT) or pytorch_lora_weights.safetensors in it")
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files are read from .safetensors only")
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        keys = list(fh.keys())
    if any(m in k for k in keys for m in LYCORIS_MARKERS):
        raise LoraFormatError(f"{path}: a LyCORIS file (LoHa/LoKr/...); only plain LoRA (lora_down/lora_up) "
                              "is supported by these tools")
    tensors = load_file(str(path))
    if any(k.endswith(".lora_down.weight") for k in keys):
        return _read_kohya(tensors, metadata, path)
    if any(".lora_A." in k for k in keys):
        return _read_diffusers(tensors, metadata, path)
    raise LoraFormatError(f"{path}: no LoRA tensors found (expected .lora_down/.lora_up or .lora_A/.lora_B keys)")


def _read_kohya(tensors: dict, metadata: dict, path: Path) -> LoraSet:
    modules = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise LoraFormatError(f"{path}: {name} has lora_down but no lora_up")
        alpha = tensors.get(f"{name}.alpha")
        modules[name] = LoraModule(tensors[key], up, None if alpha is None else float(alpha),
                                   tensors.get(f"{name}.dora_scale"))
    return LoraSet(modules, "kohya", metadata, path=path)


def _read_diffusers(tensors: dict, metadata: dict, path: Path) -> LoraSet:
    """diffusers keys (`unet.<path>.lora_A.weight`, `text_encoder.<path>...`); alphas from its metadata."""
    flat = json.loads(metadata.get("lora_adapter_metadata", "{}"))  # {"unet.r": 4, "unet.lora_alpha": 8, ...}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field_name = key.partition(".")
        configs.setdefault(part, {})[field_name] = value
    modules = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        part = name.split(".", 1)[0]
        cfg = configs.get(part, {})
        alpha = _peft_alpha(cfg, name.split(".", 1)[1], tensors[key].shape[0]) if cfg else None
        modules[name] = LoraModule(tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")], alpha)
    return LoraSet(modules, "diffusers", metadata, path=path)


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    """The alpha that reproduces peft's scale for `module` (alpha_pattern, rsLoRA included)."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = float(value)
    return file_alpha(alpha, rank, bool(config.get("use_rslora")))


def _read_peft(folder: Path) -> LoraSet:
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise LoraFormatError(f"{folder}: adapter_model.safetensors is missing (.bin adapters are not read: pickle)")
    check_safetensors(weights)
    tensors = load_file(str(weights))
    modules = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        rank = tensors[key].shape[0]
        magnitude = tensors.get(f"{name}.lora_magnitude_vector")
        if magnitude is None:
            magnitude = tensors.get(f"{name}.lora_magnitude_vector.weight")
        modules[name] = LoraModule(tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")],
                                   _peft_alpha(config, name, rank), magnitude)
    return LoraSet(modules, "peft", {}, peft_config=config, path=folder)


def target_name(path: str) -> str:
    """peft's target name of a module: its last path part, or the last two for `to_out.0`."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def peft_layout(modules: dict[str, LoraModule], short=lambda name: name) -> tuple[dict, dict]:
    """peft tensors (`<name>.lora_A/B.weight`) and the config fields that reproduce every module's scale:
    the most common rank and alpha, and rank_pattern / alpha_pattern for the others (keyed by `short`)."""
    tensors, ranks, alphas = {}, {}, {}
    for name, m in modules.items():
        tensors[f"{name}.lora_A.weight"] = m.down.contiguous()
        tensors[f"{name}.lora_B.weight"] = m.up.contiguous()
        ranks[short(name)], alphas[short(name)] = m.rank, (m.alpha if m.alpha is not None else float(m.rank))
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    fields = {"r": r, "lora_alpha": a, "target_modules": sorted({target_name(n) for n in ranks}),
              "rank_pattern": {k: v for k, v in ranks.items() if v != r},
              "alpha_pattern": {k: v for k, v in alphas.items() if v != a}}
    return tensors, fields


def write_peft_folder(lora: LoraSet, folder: Path, base_config: dict | None = None) -> Path:
    """A PEFT adapter folder; one rank/alpha per file when they agree, else rank_pattern/alpha_pattern."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, fields = peft_layout(lora.modules, lambda n: n.split(".", 2)[-1] if n.startswith("base_model.model.") else n)
    config = dict(base_config or {})
    config.update({
        "peft_type": "LORA", "task_type": config.get("task_type", "CAUSAL_LM"), **fields,
        "use_rslora": False, "use_dora": False,
        "lora_dropout": config.get("lora_dropout", 0.0), "bias": "none",
    })
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
