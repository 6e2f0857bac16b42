"""diffusers → original layout, checked against diffusers' own single-file reader."""

import pytest
from safetensors.torch import save_file

from lora_scripts.models.detect import detect_model_type
from lora_scripts.models.sd import build_tiny_sd, load_sd, save_config_folder_for
from lora_scripts.models.sd_convert import pipeline_to_original


@pytest.mark.parametrize("model_type", ["sd15", "sdxl"])
def test_single_file_round_trip_is_exact(tmp_path, model_type):
    pipe = build_tiny_sd(model_type, seed=5)
    state = pipeline_to_original(pipe)
    save_file(state, tmp_path / "m.safetensors")
    save_config_folder_for(pipe, tmp_path / "cfg")
    assert detect_model_type(str(tmp_path / "m.safetensors")) == model_type
    loaded = load_sd(str(tmp_path / "m.safetensors"), model_type, tmp_path / "cfg").pipe
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if model_type == "sdxl" else [])
    for name in names:
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(a[k].equal(b[k]) for k in a), name
    if model_type == "sd15":  # spot-check the names the WebUIs expect
        assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in state
        assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in state
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    else:
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
        assert "model.diffusion_model.label_emb.0.0.weight" in state
