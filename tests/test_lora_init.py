"""lora_init: PiSSA and OLoRA starts on a tiny Llama. Both move part of each frozen weight into the adapter
while training; the export is converted back (peft's conversion) to a plain LoRA of twice the rank that,
on the original model, is the model as trained; and the drift check still measures against the original."""

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
