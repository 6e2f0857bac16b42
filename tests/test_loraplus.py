"""LoRA+ (`loraplus_lr_ratio`): the B matrices learn at ratio x the rate of the A matrices, in both families."""

from __future__ import annotations

import json

import torch
import yaml
from safetensors import safe_open

from lora_scripts.config_file import load_config
from lora_scripts.train.common import lora_param_groups
from lora_scripts.train.llm import train_llm
from lora_scripts.train.sd import train_sd
from test_llm_train import overrides
from test_sd_train import sd_args


def saved_groups(folder) -> list[dict]:
    """The optimizer's param groups as the last checkpoint stored them."""
    ckpt = sorted(folder.glob("checkpoint-*"))[-1]
    return torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]


def test_llm_b_matrices_learn_at_ratio_times_the_rate(tiny_llama, pairs_csv, tmp_path):
    out = tmp_path / "plus"
    train_llm(load_config(None, overrides(tiny_llama, pairs_csv, out, epochs=1, loraplus_lr_ratio=16)), progress=False)
    groups = {g["name"]: g for g in saved_groups(out)}
    assert set(groups) == {"lora_A", "lora_B"}
    a, b = groups["lora_A"], groups["lora_B"]
    assert b["initial_lr"] == 16 * a["initial_lr"] == 16 * 5e-3
    assert abs(b["lr"] - 16 * a["lr"]) <= 1e-12 * b["lr"]  # the schedule scales both alike
    assert len(a["params"]) == len(b["params"]) > 0  # one A and one B per adapted layer
    assert yaml.safe_load((out / "config.yaml").read_text())["loraplus_lr_ratio"] == 16


def test_split_by_peft_names_and_off_by_default():
    named = [("q.lora_A.default.weight", torch.nn.Parameter(torch.zeros(2))),
             ("q.lora_B.default.weight", torch.nn.Parameter(torch.zeros(2))),
             ("emb.lora_embedding_B.default", torch.nn.Parameter(torch.zeros(2))),
             ("q.lora_magnitude_vector.default.weight", torch.nn.Parameter(torch.zeros(2)))]
    one = lora_param_groups(named, 1e-4, None)
    assert len(one) == 1 and len(one[0]["params"]) == 4
    a, b = lora_param_groups(named, 1e-4, 4)
    assert [p for p in b["params"]] == [named[1][1], named[2][1]] and b["lr"] == 4e-4
    assert len(a["params"]) == 2 and a["lr"] == 1e-4  # A, and DoRA's magnitudes, at the base rate


def test_sd_unet_and_text_encoder_each_get_their_pair(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    out = tmp_path / "sd"
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, out, max_train_steps=2, sample_every_n_epochs="null",
                              text_encoder_lr=5e-5, loraplus_lr_ratio=4), progress=False)
    lrs = [g["initial_lr"] for g in saved_groups(out)]
    assert lrs == [1e-3, 4e-3, 5e-5, 2e-4]  # UNet A, B; text encoder A, B
    with safe_open(str(result.lora_file), framework="pt") as fh:  # kohya keeps it as a network argument
        assert json.loads(fh.metadata()["ss_network_args"])["loraplus_lr_ratio"] == "4.0"
