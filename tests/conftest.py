"""Shared fixtures: tiny models built in code, small datasets written to tmp folders."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lora_scripts.models.embedded import is_prepared, model_dir

EMBEDDED = "smollm2-135m-instruct"


def embedded_tokenizer_dir() -> Path:
    folder = model_dir(EMBEDDED)
    if not is_prepared(folder):
        pytest.fail(f"the embedded model is not prepared in {folder}; run ./setup.sh first")
    return folder


def build_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template, saved as a transformers folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


STYLE_PAIRS = [
    (f"Question number {i}: how do I {task}?", f"Hello friend! To {task}, start small. Step one: plan. Bye!")
    for i, task in enumerate(
        ["bake bread", "fix a bike", "learn chess", "plant tomatoes", "write a poem", "clean a window",
         "tie a knot", "save money", "sleep better", "paint a wall", "brew tea", "read faster"] * 2
    )
]


def write_pairs_csv(path: Path, pairs=STYLE_PAIRS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response"])
        w.writerows(pairs)
    return path


@pytest.fixture
def pairs_csv(tmp_path) -> Path:
    return write_pairs_csv(tmp_path / "metadata.csv")


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A 2-layer CLIP with SD1.5's tokenizer (shipped) and a 32 px image processor."""
    from importlib import resources

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok = CLIPTokenizer.from_pretrained(str(resources.files("lora_scripts") / "resources" / "clip_tokenizer"))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    return folder


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A tiny BLIP captioner with a 16-word vocabulary."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "city", "night", "cat",
             "red", "blue", "the", "street"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny SD1.5-architecture model saved as an original-layout single file + its config folder."""
    from lora_scripts.models.sd import build_tiny_sd, save_single_file

    d = tmp_path_factory.mktemp("tiny_sd15")
    return save_single_file(build_tiny_sd("sd15"), d / "tiny-sd15.safetensors", d / "config")


@pytest.fixture
def style_images(tmp_path):
    """Six small images of mixed aspect ratios with a metadata.csv."""
    import numpy as np
    from PIL import Image

    d = tmp_path / "cyberpunk_night"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,prompt"]
    for i, (w, h) in enumerate([(128, 128), (192, 128), (128, 192), (160, 160), (256, 128), (128, 128)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
        rows.append(f'img{i}.png,"neon city, rain, night, view {i}"')
    (d / "metadata.csv").write_text("\n".join(rows) + "\n")
    return d


def write_description_config(path: Path, images: Path, ckpt: Path, out: Path, **keys) -> Path:
    """The description's own SD config (its 13 keys, its values), with `keys` changed or added."""
    import yaml

    config = {"train_data_dir": str(images), "metadata_path": str(images / "metadata.csv"), "base_model": str(ckpt),
              "lora_rank": 8, "lora_alpha": 16, "batch_size": 4, "epochs": 10, "learning_rate": 1e-4,
              "optimizer": "AdamW", "scheduler": "cosine", "output_dir": str(out), "save_steps": 100,
              "logging_dir": str(out / "logs")}
    config.update({k: str(v) if isinstance(v, Path) else v for k, v in keys.items()})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
