"""The SD loop's caches: text embeddings on disk, and which frozen parts leave the device once they are built."""

from __future__ import annotations

import pytest
import torch

from lora_scripts.models.sd import SDModel, build_tiny_sd, encode_prompts
from lora_scripts.train.sd_caches import PromptEncoder, park, parts_to_park, unparked


@pytest.fixture(params=["sd15", "sdxl"])
def tiny_model(request, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    return SDModel(pipe=build_tiny_sd(request.param), model_type=request.param, prediction_type="epsilon")


def test_text_embeddings_are_cached_on_disk_and_read_back_exactly(tiny_model):
    captions = ["a neon cat", "a red fox at night", "a neon cat"]
    enc = PromptEncoder(tiny_model, None, cached=True)
    assert enc.fill(captions) == (0, 2)  # two distinct captions encoded
    assert len(list(enc.folder.glob("*.safetensors"))) == 2
    again = PromptEncoder(tiny_model, None, cached=True)  # a second run, or a resume: nothing to encode
    assert again.fill(captions) == (2, 0)
    hidden, pooled = again(captions)
    with torch.no_grad():
        want_hidden, want_pooled = encode_prompts(tiny_model, captions)
    assert torch.equal(hidden, want_hidden)
    assert (pooled is None) == (tiny_model.model_type != "sdxl")
    if pooled is not None:
        assert torch.equal(pooled, want_pooled)


def test_a_damaged_cache_file_is_encoded_again(tiny_model):
    enc = PromptEncoder(tiny_model, None, cached=True)
    enc.fill(["a neon cat"])
    path = enc.path("a neon cat")
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x7f" * 8  # flip the last tensor bytes: the checksum no longer matches
    path.write_bytes(bytes(data))
    hidden, _ = enc(["a neon cat"])
    with torch.no_grad():
        assert torch.equal(hidden, encode_prompts(tiny_model, ["a neon cat"])[0])
    assert enc.fill(["a neon cat"]) == (1, 0)  # rewritten whole


def test_a_different_text_encoder_gets_its_own_cache(tiny_model, monkeypatch):
    enc = PromptEncoder(tiny_model, None, cached=True)
    with torch.no_grad():
        tiny_model.text_encoders[0].get_input_embeddings().weight.add_(0.5)
    other = PromptEncoder(tiny_model, None, cached=True)
    assert other.folder != enc.folder


def test_parts_parked_once_the_caches_hold_everything(tiny_model):
    vae, encoders = tiny_model.vae, tiny_model.text_encoders
    assert parts_to_park(tiny_model, latents_cached=True, prompts_cached=True) == [vae, *encoders]
    assert parts_to_park(tiny_model, latents_cached=True, prompts_cached=False) == [vae]  # trained or augmented
    assert parts_to_park(tiny_model, latents_cached=False, prompts_cached=True) == list(encoders)
    # on a CPU, RAM is the device: nothing moves
    park([vae], torch.device("cpu"))
    with unparked([vae], torch.device("cpu")):
        assert next(vae.parameters()).device.type == "cpu"
