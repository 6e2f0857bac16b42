"""Mixed-precision speed work changes no number: peft's input casts skipped, SD's frozen layers kept in bf16."""

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.utils._python_dispatch import TorchDispatchMode

from lora_scripts.models.sd import load_sd, restore_frozen_layers, store_frozen_layers_in
from lora_scripts.train.common import lora_inputs_uncast


class CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        return func(*args, **(kwargs or {}))


def step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with CountCopies() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return out.detach(), grads, x.grad.clone(), counter.copies


def lora_flags(model):
    return [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]


def test_uncast_lora_inputs_give_bitwise_the_same_step_with_fewer_copies():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 16))
    model.requires_grad_(False)
    # random B too, so every adapter changes the output and has gradients of its own
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "2", "4"], init_lora_weights=False), model)
    x = torch.randn(8, 16)
    out, grads, x_grad, copies = step(model, x)
    with lora_inputs_uncast(model, "bf16"):
        assert lora_flags(model) == [False] * 3
        out2, grads2, x_grad2, copies2 = step(model, x)
    assert lora_flags(model) == [True] * 3  # put back for whoever uses the model next
    assert out2.dtype == torch.bfloat16 and torch.equal(out, out2)
    assert len(grads) == len(grads2) == 6
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    assert torch.equal(x_grad, x_grad2)
    # layers 2 and 4 get bf16 inputs: a cast to fp32 forward and one back in the backward for each
    assert copies2 <= copies - 4, (copies, copies2)

    with lora_inputs_uncast(model, "no"):  # full precision: the cast is what makes the dtypes match
        assert lora_flags(model) == [True] * 3


def test_sd_frozen_layers_in_bf16_give_bitwise_the_same_step_and_come_back_exactly(tiny_sd15):
    ckpt, cfg_dir = tiny_sd15
    model = load_sd(str(ckpt), "sd15", cfg_dir)
    unet = model.unet.requires_grad_(False)
    fp32 = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                                init_lora_weights=False))  # random B: every adapter moves the output
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim,
                                                                           generator=g)

    def step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(latents, torch.tensor([10, 700]), hidden).sample
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in unet.parameters() if p.requires_grad]

    out, grads = step()
    store_frozen_layers_in(unet, torch.bfloat16)
    assert unet.conv_in.weight.dtype == unet.conv_in.bias.dtype == torch.bfloat16
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_q.base_layer.weight.dtype == torch.bfloat16 and attn.to_q.lora_A["default"].weight.dtype == torch.float32
    assert unet.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32  # norms are computed in fp32
    out2, grads2 = step()
    assert torch.equal(out, out2) and len(grads) == len(grads2) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))

    restore_frozen_layers(unet, load_sd(str(ckpt), "sd15", cfg_dir).unet)
    restored = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert restored.keys() == fp32.keys() and all(torch.equal(restored[k], fp32[k]) for k in fp32)


def test_sd_frozen_layers_in_bf16_let_go_of_the_mapped_model_file(tmp_path):
    """diffusers maps the weights file; while any tensor points into it, its pages count against the
    process (200 MB of the bench's peak RSS). After the cast nothing does, so the mapping is gone."""
    import gc

    from diffusers import UNet2DConditionModel

    from lora_scripts.models.sd import build_tiny_sd

    build_tiny_sd("sd15").unet.save_pretrained(tmp_path / "unet")
    weights = str(next((tmp_path / "unet").glob("*.safetensors")))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").requires_grad_(False)

    def mapped():
        with open("/proc/self/maps") as fh:
            return weights in fh.read()

    assert mapped()  # as loaded: the file backs the tensors
    store_frozen_layers_in(unet, torch.bfloat16)
    gc.collect()
    assert not mapped()


def test_sd_training_in_bf16_changes_the_model_only_while_it_runs(tiny_sd15, style_images, tmp_path, monkeypatch):
    """bf16 run with a text-encoder LoRA: in every step peft's casts are off and the frozen UNet layers are
    bf16; the returned model has the casts back on and exactly the base model's fp32 weights."""
    from lora_scripts.config_file import load_config
    from lora_scripts.train import sd as sd_train

    ckpt, cfg_dir = tiny_sd15
    loaded = []
    real_load = sd_train.load_sd
    monkeypatch.setattr(sd_train, "load_sd", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    seen = []

    def during_steps(event):
        if event["event"] == "step":
            model = loaded[0]
            seen.append((set(lora_flags(model.unet)) | set(lora_flags(model.text_encoders[0])),
                         model.unet.conv_in.weight.dtype))

    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "base_model": ckpt, "model_config_dir": cfg_dir, "model_type": "sd15", "train_data_dir": style_images,
        "output_dir": tmp_path / "out", "resolution": 64, "batch_size": 2, "max_train_steps": 2, "lora_rank": 4,
        "text_encoder_lr": 1e-4, "mixed_precision": "bf16", "sample_every_n_epochs": "null"}.items()])
    result = sd_train.train_sd(cfg, callback=during_steps, progress=False)
    assert seen == [({False}, torch.bfloat16)] * 2
    assert result.trained_model.unet.conv_in.weight.dtype == torch.bfloat16  # restored only when asked for
    assert set(lora_flags(result.model.unet)) == set(lora_flags(result.model.text_encoders[0])) == {True}
    base = load_sd(str(ckpt), "sd15", cfg_dir).unet.state_dict()
    trained = {k.replace(".base_layer", ""): v.cpu() for k, v in result.model.unet.state_dict().items() if "lora_" not in k}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)


def test_llm_training_in_bf16_skips_the_casts_only_while_it_runs(tiny_llama, pairs_csv, tmp_path, monkeypatch):
    import peft

    from lora_scripts.config_file import load_config
    from lora_scripts.train import llm as llm_train

    built = []
    real = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    seen = []
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": tmp_path / "run", "batch_size": 4,
        "max_train_steps": 2, "mixed_precision": "bf16", "sample_prompts": "[]"}.items()])
    result = llm_train.train_llm(cfg, callback=lambda e: e["event"] == "step" and seen.append(set(lora_flags(built[0]))),
                                 progress=False)
    assert seen == [{False}, {False}]
    assert set(lora_flags(result.model)) == {True}
