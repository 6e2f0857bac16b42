"""AdaLoRA (lora_type: adalora) on a tiny Llama and a tiny SD1.5 UNet: the rank budget really shrinks to the
target, the penalty is peft's, the exports are plain LoRAs that rebuild the trained model in peft,
diffusers and the A1111 formula, and a resumed run allocates ranks exactly as an unbroken one."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.config import ConfigError
from lora_scripts.config_file import load_config
from lora_scripts.models.sd import load_sd
from lora_scripts.preflight import run_preflight
from lora_scripts.train import llm as llm_train
from lora_scripts.train.adalora import RankBudget
from lora_scripts.train.sd import train_sd
from test_llm_train import overrides
from test_sd_train import a1111_apply, sd_args, unet_and_te_outputs


def peft_ranks(folder) -> dict[str, int]:
    """Per-module ranks of an exported PEFT folder, read off its tensors."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {k.split(".lora_A.")[0]: v.shape[0] for k, v in tensors.items() if ".lora_A." in k}


def test_llm_budget_shrinks_to_the_target_and_the_export_rebuilds_the_model(tiny_llama, pairs_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ada"
    cfg = load_config(None, overrides(tiny_llama, pairs_csv, out, lora_type="adalora", lora_rank=2,
                                      adalora_init_rank=6, target_modules="all-linear"))
    assert cfg.adalora_ranks == (6, 2) and cfg.alpha == 12.0  # target lora_rank; alpha 2 x init
    result = llm_train.train_llm(cfg, progress=False)
    ranks = peft_ranks(out)
    modules = 2 * 7  # all-linear: q, k, v, o, gate, up, down in 2 layers
    dropped = modules - len(ranks)
    # every module began at 6; the budget left an average of 2 (rank-0 modules count as 0) ...
    assert sum(ranks.values()) == 2 * modules and len(set(ranks.values())) > 1 and max(ranks.values()) <= 6
    assert dropped > 0  # some modules lost every triplet: the export leaves them out by name
    # ... and the info line says the same
    summary = [e["message"] for e in result.events if e["event"] == "info" and "AdaLoRA ranks" in e["message"]]
    assert summary and summary[0].startswith(f"AdaLoRA ranks: mean 2.00 (target 2, from 6) over {modules} modules")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["exclude_modules"] or []) == dropped

    # the plain LoRA, loaded by peft itself onto a fresh base, is the model as trained
    ids = torch.tensor([[1, 520, 3000, 12, 77, 4000, 9]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids.to(result.model.device)).logits.cpu()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        base_logits = base(input_ids=ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
    assert not [w for w in caught if "exclude" in str(w.message) or "missing" in str(w.message).lower()]
    assert float((loaded - trained).abs().max()) <= 1e-5
    assert float((base_logits - trained).abs().max()) > 1e-3  # training changed the model


def test_penalty_is_peft_own_orthogonal_regulariser(tiny_llama):
    """peft adds orth_reg_weight x the mean ||AAᵀ - I|| / ||BᵀB - I|| to an output's `.loss`; ours is the
    same number, computed where our loops take their loss."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
    budget = RankBudget(model.base_model)
    assert len(budget.matrices) == 2 * 2 * 2  # A and B of q and v in 2 layers
    ids = torch.tensor([[1, 520, 3000, 12, 77]])
    with torch.no_grad():
        with_penalty = model(input_ids=ids, labels=ids).loss
        model.peft_config["default"].orth_reg_weight = 0.0
        without = model(input_ids=ids, labels=ids).loss
        model.peft_config["default"].orth_reg_weight = 0.5
        ours = budget.penalty()
    assert float(ours) > 0.1  # random A, B are far from orthonormal
    torch.testing.assert_close(with_penalty - without, ours, rtol=1e-5, atol=1e-6)


def test_resume_restores_the_rank_scores_exactly(tiny_llama, pairs_csv, tmp_path):
    """A run stopped at step 9 of 18 and resumed from its checkpoint ends with the same ranks and weights as
    the unbroken run: the allocator's sensitivity averages and mask travel in the checkpoint."""
    whole = tmp_path / "whole"
    cfg = overrides(tiny_llama, pairs_csv, whole, lora_type="adalora", lora_rank=4, save_steps=9)
    llm_train.train_llm(load_config(None, cfg), progress=False)
    assert (whole / "checkpoint-000009" / "adalora_budget.safetensors").exists()
    scores = load_file(whole / "checkpoint-000009" / "adalora_budget.safetensors")
    assert any(k.startswith("exp_avg_ipt/") for k in scores) and any(k.startswith("rank_pattern/") for k in scores)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(whole / "checkpoint-000009", resumed / "checkpoint-000009")
    llm_train.train_llm(load_config(None, overrides(tiny_llama, pairs_csv, resumed, lora_type="adalora", lora_rank=4,
                                                    save_steps=9, resume_from="latest")), progress=False)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert peft_ranks(whole) == peft_ranks(resumed) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_schedule_and_rank_errors_come_before_training(tiny_llama, pairs_csv, tmp_path):
    cfg = load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", lora_type="adalora", epochs=1,
                                      adalora_tinit=4, adalora_tfinal=2))
    report = run_preflight(cfg)  # 24 samples / 4 = 6 steps: 4 + 2 leave none for the budget
    assert any("adalora_tinit (4) + adalora_tfinal (2) leave none of the 6 training steps" in e for e in report.errors)
    with pytest.raises(ConfigError, match="adalora_target_rank \\(16\\) is above adalora_init_rank \\(8\\)"):
        load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", lora_type="adalora",
                                    adalora_target_rank=16, adalora_init_rank=8))
    with pytest.raises(ConfigError, match="adalora_init_rank set but lora_type is 'lora'"):
        load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", adalora_init_rank=8))


def test_preflight_warns_when_the_learning_rate_cannot_grow_the_singular_values(tiny_llama, pairs_csv, tmp_path):
    slow = run_preflight(load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", lora_type="adalora",
                                                     learning_rate=1e-3)))  # 18 steps: reach 0.018
    assert any("18 steps at 0.001 reach 0.018" in w and "Raise learning_rate to about 0.03" in w for w in slow.warnings)
    fast = run_preflight(load_config(None, overrides(tiny_llama, pairs_csv, tmp_path / "x", lora_type="adalora",
                                                     learning_rate=2e-2)))
    assert not any("AdaLoRA starts its singular values" in w for w in fast.warnings)


def test_sd_unet_adalora_kohya_and_diffusers_files_rebuild_the_model(tiny_sd15, style_images, tmp_path):
    """AdaLoRA on the UNet's attention and convolutions (LoCon), a plain LoRA on the text encoder: the kohya
    file, with a rank and alpha per module, gives the trained model in diffusers and by A1111's formula."""
    ckpt, cfg_dir = tiny_sd15
    result = train_sd(sd_args(ckpt, cfg_dir, style_images, tmp_path / "ada", lora_type="adalora", lora_rank=2,
                              train_unet_conv="true", text_encoder_lr=5e-4, max_train_steps=6,
                              sample_every_n_epochs="null"), progress=False)
    tensors = load_file(result.lora_file)
    with safe_open(str(result.lora_file), "pt") as fh:
        network_args = json.loads(fh.metadata()["ss_network_args"])
        assert fh.metadata()["ss_network_dim"] == "3" and fh.metadata()["ss_network_alpha"] == "3.0"
    assert network_args["adalora_init_rank"] == "3" and network_args["adalora_target_rank"] == "2"
    unet_alphas = {float(v) for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith(".alpha")}
    assert unet_alphas == {3.0}  # one alpha, init_r, in the whole UNet; ranks differ
    unet_ranks = {k.split(".")[0]: v.shape[0] for k, v in tensors.items()
                  if k.startswith("lora_unet_") and k.endswith("lora_down.weight")}
    te_ranks = {v.shape[0] for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_down.weight")}
    summary = next(e["message"] for e in result.events if e["event"] == "info" and "AdaLoRA ranks" in e["message"])
    modules = int(summary.split(" over ")[1].split()[0])
    assert sum(unet_ranks.values()) == 2 * modules and len(set(unet_ranks.values())) > 1  # mean 2, from 3
    assert te_ranks == {2}  # the text encoder: plain LoRA at lora_rank
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors or any(
        "resnets" in k for k in unet_ranks)
    expected_unet, expected_te = unet_and_te_outputs(result.model.pipe)
    for file in [result.lora_file, result.diffusers_file]:
        pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        unet_out, te_out = unet_and_te_outputs(pipe)
        # 1e-4: the file's down = diag(E) A and folded scale re-associate peft's float32 products
        assert float((unet_out - expected_unet).abs().max()) <= 1e-4, file.name
        assert float((te_out - expected_te).abs().max()) <= 1e-5, file.name
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    assert a1111_apply(pipe, result.lora_file) == len(unet_ranks) + 2 * 4
    assert float((unet_and_te_outputs(pipe)[0] - expected_unet).abs().max()) <= 1e-4
