"""lora_init: PiSSA and OLoRA starts on a tiny Llama and a tiny SD1.5. Both move part of each frozen weight
into the adapter while training; the export is converted back to a plain LoRA of twice the rank that, on the
original model, is the model as trained (LLM: peft's conversion; SD: the kohya and diffusers files, and the
A1111 formula); and the LLM's drift check still measures against the original."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_scripts.config import ConfigError
from lora_scripts.config_file import load_config
from lora_scripts.train import llm as llm_train
from test_llm_train import overrides


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_original_model_is_the_trained_model(tiny_llama, pairs_csv, tmp_path, init):
    out = tmp_path / init
    result = llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, out, epochs=1, lora_rank=4,
                                                             lora_init=init)), progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["init_lora_weights"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {8}  # rank 2 x 4: trained and initial
    ids = torch.tensor([[1, 520, 3000, 12, 77, 4000, 9]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids.to(result.model.device)).logits.cpu()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        base_logits = base(input_ids=ids).logits
        converted = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
    assert float((converted - trained).abs().max()) <= 1e-4
    assert float((base_logits - trained).abs().max()) > 1e-3  # the run changed the model
    # the frozen weights in training were the residual, not the model file's
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    residual = dict(result.model.named_parameters())[f"{q}.base_layer.weight"]
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].self_attn.q_proj.weight.detach()
    assert float((residual.detach().cpu() - original).abs().max()) > 1e-3


def test_drift_check_measures_against_the_original_model(tiny_llama, pairs_csv, tmp_path):
    """PiSSA's frozen weights are the residual: switching the adapter off would not give the base. The
    retention reference (the base model's loss on its own answers) is the same as a plain LoRA run's."""
    def retention_base(out, **kw):
        result = llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, out, max_train_steps=1,
                                                                 lora_rank=4, **kw)), progress=False)
        return next(e for e in result.events if e["event"] == "eval")["retention_base"]

    plain = retention_base(tmp_path / "plain")
    assert abs(retention_base(tmp_path / "pissa", lora_init="pissa") - plain) <= 1e-4 * plain


def test_pissa_refuses_adapters_with_their_own_start(tiny_llama, pairs_csv, tmp_path):
    with pytest.raises(ConfigError, match="lora_init: pissa starts a plain LoRA from the weights; lora_type dora"):
        load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", lora_init="pissa", lora_type="dora"))


def test_sd_pissa_files_rebuild_the_trained_model_on_the_original_weights(tiny_sd15, style_images, tmp_path):
    """PiSSA on the UNet's attention and the text encoder: the kohya file holds each module's update against
    the original weights (rank 2 x 4), and it, the diffusers file and the A1111 formula rebuild the model."""
    from lora_scripts.models.sd import load_sd
    from lora_scripts.train.sd import train_sd
    from test_sd_train import a1111_apply, sd_args, unet_and_te_outputs

    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "pissa", lora_init="pissa", lora_rank=4,
                              text_encoder_lr=5e-4, max_train_steps=3, sample_every_n_epochs="null"), progress=False)
    assert result.reload_unet is None  # the frozen weights are the residual: kept as they are, in fp32
    tensors = load_file(result.lora_file)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {8}
    assert {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {24.0}  # alpha 12 over 4 -> 24 over 8
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    original = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    base_unet, _ = unet_and_te_outputs(original)
    assert float((base_unet - expected_unet).abs().max()) > 1e-3  # the run changed the model
    assert float((original.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach()
                  - result.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer
                  .weight.detach().cpu()).abs().max()) > 1e-3  # trained on the residual
    for file in [result.lora_file, result.diffusers_file]:
        pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        unet_out, te_out = unet_and_te_outputs(pipe)
        assert float((unet_out - expected_unet).abs().max()) <= 1e-4, file.name
        assert float((te_out - expected_te).abs().max()) <= 1e-4, file.name
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    a1111_apply(pipe, result.lora_file)
    unet_out, te_out = unet_and_te_outputs(pipe)
    assert float((unet_out - expected_unet).abs().max()) <= 1e-4 and float((te_out - expected_te).abs().max()) <= 1e-4


def test_sd_pissa_refuses_convolutions(tiny_sd15, style_images, tmp_path):
    from lora_scripts.train.sd import train_sd
    from test_sd_train import sd_args

    ckpt, cfg_dir = tiny_sd15
    with pytest.raises(ConfigError, match="peft cannot start the UNet's convolutions"):
        sd_args(ckpt, cfg_dir, style_images, tmp_path / "c", lora_init="olora", train_unet_conv="true")
    with pytest.raises(ConfigError, match="SD1.5's all-linear includes its 1x1 proj_in/proj_out"):
        train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "a", lora_init="olora", target_modules="all-linear",
                         max_train_steps=1, sample_every_n_epochs="null"), progress=False)
