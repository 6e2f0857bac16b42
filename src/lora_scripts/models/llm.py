"""Causal LLM builders: resolve `base_model`, load model + tokenizer offline, and make the PEFT config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.models.adapters import adalora_config, peft_init
from lora_scripts.models.embedded import (
    EMBEDDED_MODELS,
    cache_root,
    convert_gguf,
    is_prepared,
    resolve_embedded,
)
from lora_scripts.models.mapped import copy_off_the_file
from lora_scripts.safety import check_safetensors

# Attention projections by architecture family, in the order we look for them. The first family whose
# names all occur in the model wins; otherwise every linear layer is adapted.
ATTENTION_TARGETS = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    ["q_proj", "k_proj", "v_proj", "out_proj"],  # OPT, BART-style
    ["query_key_value", "dense"],  # Falcon, BLOOM, GPT-NeoX
    ["c_attn", "c_proj"],  # GPT-2
    ["Wqkv", "out_proj"],  # MPT
]


class ModelLoadError(RuntimeError):
    pass


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def resolve_llm_path(base_model: str, log=print) -> Path:
    """A local transformers folder for `base_model` (embedded name, folder, or .gguf converted once)."""
    if base_model.lower() in EMBEDDED_MODELS:
        return resolve_embedded(base_model)
    path = Path(base_model).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        elif ggufs:
            raise ModelLoadError(f"{path}: holds several .gguf files; name one of them in base_model")
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = _gguf_cache_folder(path)
        if not is_prepared(folder):
            log(f"{path.name}: dequantizing the GGUF once into {folder}")
            convert_gguf(path, folder, {"source": str(path.resolve())}, log=log)
        return folder
    if path.is_dir():
        return path
    raise ModelLoadError(
        f"base_model {base_model}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "a transformers folder with config.json, or a .gguf file"
    )


def load_llm(base_model: str, dtype: torch.dtype = torch.float32, log=print):
    """(model, tokenizer) from local files only; nothing is fetched from a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_llm_path(base_model, log=log)
    for f in Path(folder).glob("*.safetensors"):
        check_safetensors(f)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    except OSError as exc:
        raise ModelLoadError(f"{folder}: could not load a causal LM from it: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{folder}: the tokenizer has no EOS token, so a tuned model could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def default_target_modules(model: torch.nn.Module) -> list[str] | str:
    linear_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"}
    for family in ATTENTION_TARGETS:
        if all(n in linear_names for n in family):
            return family
    return "all-linear"


def lora_config_for(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    """The peft config of the run's adapter (`total_steps`: the planned optimizer steps, which AdaLoRA's rank
    schedule needs)."""
    from peft import LoraConfig

    targets = cfg.target_modules if cfg.target_modules is not None else default_target_modules(model)
    if cfg.lora_type == "adalora":
        return adalora_config(cfg, targets, total_steps, bias="none", task_type="CAUSAL_LM")
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.lora_type == "dora",
        use_rslora=cfg.lora_type == "rslora",
        init_lora_weights=peft_init(cfg, True),
        bias="none",
        task_type="CAUSAL_LM",
    )


def save_initial_adapter(peft_model, folder: Path, write: bool) -> dict[str, torch.Tensor]:
    """A PiSSA/OLoRA adapter as initialised: saved to `folder` for peft's conversion at export (`write`: on
    the main process), and returned (trainable name -> a copy of its start).

    Saved with init_lora_weights = True, as peft requires: loading it for the conversion must not decompose
    the (residual) weights a second time."""
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        if write:
            peft_model.save_pretrained(folder, safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def context_length(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _frozen_linears_by_file_key(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Frozen Linear layers (a tied LM head excluded), keyed by their weight's name in the model files."""
    embed = model.get_input_embeddings().weight
    return {
        # peft wraps an adapted layer as `<path>.base_layer` under `base_model.model.`
        name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight": mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad and mod.weight is not embed
    }


def _file_keys(folder: Path) -> dict[str, Path]:
    return {key: f for f in sorted(Path(folder).glob("*.safetensors")) for key in check_safetensors(f)
            if key != "__metadata__"}


def store_frozen_linears_in(model: torch.nn.Module, dtype: torch.dtype, folder: Path) -> bool:
    """Keep frozen Linear weights in `dtype` (the autocast dtype) for training; False if it was not done.

    Autocast runs these matmuls in `dtype` anyway, casting each fp32 weight afresh on every forward: a
    copy of the whole model per step. Cast once, the results are bitwise the same (tested) and the
    weights take half the memory. Embeddings and norms stay fp32; an LM head tied to the embeddings gets
    a `dtype` copy of its own (+5% tokens/s on SmolLM2, whose head is a fifth of its weights). Done only
    when every cast weight can be put back exactly by restore_frozen_linears. The other tensors are
    copied off the memory-mapped model file (models/mapped.py).
    """
    layers = _frozen_linears_by_file_key(model)
    if not layers or not layers.keys() <= _file_keys(folder).keys():
        return False
    for mod in layers.values():
        mod.weight.data = mod.weight.data.to(dtype)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is not None and head.weight is embed and not embed.requires_grad:
        head.weight = torch.nn.Parameter(embed.detach().to(dtype), requires_grad=False)
    copy_off_the_file(model, dtype)
    return True


def restore_frozen_linears(model: torch.nn.Module, folder: Path) -> None:
    """Undo store_frozen_linears_in: the exact fp32 weights, read back from the model files."""
    from safetensors import safe_open

    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is not None and head.weight.dtype != embed.dtype and getattr(model.config, "tie_word_embeddings", False):
        head.weight = embed  # tie it again
    files = _file_keys(folder)
    for key, mod in _frozen_linears_by_file_key(model).items():
        if mod.weight.dtype == torch.float32:
            continue
        # One tensor per opening: the file is mapped only while this tensor is copied out of it, so the
        # restore never holds the pages of the whole model on top of the weights it builds.
        with safe_open(str(files[key]), framework="pt") as fh:
            mod.weight.data = fh.get_tensor(key).to(torch.float32)
