"""The LoRA tools on tiny SD and LLM models built in code, checked tensor by tensor and output by output."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from lora_scripts.cli import main
from lora_scripts.export.kohya import kohya_state_dict, write_kohya
from lora_scripts.export.lora_files import LoraFormatError, read_lora
from lora_scripts.models.sd import TE_TARGETS, UNET_ATTENTION, add_text_encoder_adapter, load_sd
from lora_scripts.tools.ops import combine, convert, resize


def make_kohya(ckpt, cfg_dir, path, seed, rank, alpha):
    """A LoRA with random (non-zero) up and down weights, exported by the trainer's own kohya writer."""
    model = load_sd(str(ckpt), "sd15", cfg_dir)
    torch.manual_seed(seed)
    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_ATTENTION, init_lora_weights=False))
    add_text_encoder_adapter(model.pipe.text_encoder, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS,
                                                                 init_lora_weights=False))
    write_kohya(path, kohya_state_dict(model.unet, [model.pipe.text_encoder], "sd15", torch.float32),
                {"ss_output_name": path.stem, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                 "ss_base_model_version": "sd_v1"})
    return path


@pytest.fixture(scope="module")
def loras(tiny_sd15, tmp_path_factory):
    ckpt, cfg_dir = tiny_sd15
    d = tmp_path_factory.mktemp("loras")
    return make_kohya(ckpt, cfg_dir, d / "style.safetensors", 1, 4, 8), make_kohya(ckpt, cfg_dir, d / "char.safetensors", 2, 2, 1)


def outputs(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a neon city"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([300]), hidden).sample, hidden


def test_inspect_reports_format_ranks_and_warnings(loras, tmp_path, capsys):
    assert main(["inspect", str(loras[0])]) == 0
    out = capsys.readouterr().out
    assert "format:   kohya" in out and "family:   sd15" in out
    assert "modules:  56  lora_te: 8, lora_unet: 48" in out
    assert "r=4 alpha=8.0 scale=2: 56 modules" in out and "ss_output_name = style" in out
    assert "warnings: none" in out
    tensors = load_file(loras[1])
    broken = {k.replace("_text_model_", "_"): v for k, v in tensors.items() if not k.endswith(".alpha")}
    write_kohya(tmp_path / "broken.safetensors", broken, {})
    assert main(["inspect", str(tmp_path / "broken.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "have no alpha" in out and "lack 'text_model'" in out


def test_convert_round_trip_is_bit_exact_and_loads_in_diffusers(loras, tiny_sd15, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    dfile = convert(loras[0], tmp_path / "diff", "diffusers", cfg_dir)
    back = convert(dfile, tmp_path / "back.safetensors", "kohya", cfg_dir)
    a, b = load_file(loras[0]), load_file(back)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    results = []
    for file in (loras[0], dfile):
        pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        results.append(outputs(pipe))
    assert float((results[0][0] - results[1][0]).abs().max()) <= 1e-6
    assert float((results[0][1] - results[1][1]).abs().max()) <= 1e-6
    with pytest.raises(LoraFormatError, match="no PEFT adapter folder form"):
        convert(loras[0], tmp_path / "p", "peft", cfg_dir)


def test_merge_equals_runtime_loras_at_their_strengths(loras, tiny_sd15, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    assert main(["merge", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora", f"{loras[0]}:0.8",
                 "--lora", f"{loras[1]}:0.5", "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = outputs(load_sd(str(tmp_path / "merged.safetensors"), "sd15", cfg_dir).pipe)
    pipe = load_sd(str(ckpt), "sd15", cfg_dir).pipe
    for name, file in (("a", loras[0]), ("b", loras[1])):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    runtime = outputs(pipe)
    base = outputs(load_sd(str(ckpt), "sd15", cfg_dir).pipe)
    assert float((merged[0] - runtime[0]).abs().max()) <= 1e-4 and float((merged[1] - runtime[1]).abs().max()) <= 1e-4
    assert float((merged[0] - base[0]).abs().max()) > 1e-3


def test_combine_concat_is_exact_and_svd_reports_energy(loras):
    a, b = read_lora(loras[0]), read_lora(loras[1])
    mix, report = combine([(a, 0.8), (b, 0.5)])
    for name, m in mix.modules.items():
        expected = a.modules[name].delta() * 0.8 + b.modules[name].delta() * 0.5
        torch.testing.assert_close(m.delta(), expected, atol=1e-5, rtol=1e-5)
        assert m.rank == 6
    svd, report = combine([(a, 0.8), (b, 0.5)], rank=3)
    assert all(m.rank == 3 for m in svd.modules.values())
    assert all(0 < r.retained < 1 for r in report)
    full, report = combine([(a, 0.8), (b, 0.5)], rank=6)
    assert min(r.retained for r in report) > 0.999999


def test_resize_to_same_rank_is_exact_and_energy_picks_ranks(loras, tmp_path, capsys):
    lora = read_lora(loras[0])
    same, report = resize(lora, rank=4)
    for name, m in same.modules.items():
        torch.testing.assert_close(m.delta(), lora.modules[name].delta(), atol=1e-5, rtol=1e-5)
    assert all(r.retained > 0.999999 for r in report)
    assert main(["resize", str(loras[0]), "--energy", "0.9", "--out", str(tmp_path / "small.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "resize: 56 modules, mean retained norm" in out
    small = read_lora(tmp_path / "small.safetensors")
    for name, m in small.modules.items():
        full = lora.modules[name].delta()
        kept = 1 - float((full - m.delta()).norm() ** 2 / full.norm() ** 2)
        assert m.rank <= 4 and kept >= 0.9 - 1e-6


def test_extract_recovers_a_merged_lora(loras, tiny_sd15, tmp_path):
    ckpt, cfg_dir = tiny_sd15
    assert main(["merge", "--base", str(ckpt), "--model-config-dir", str(cfg_dir), "--lora", str(loras[0]),
                 "--out", str(tmp_path / "tuned.safetensors")]) == 0
    assert main(["extract", "--base", str(ckpt), "--tuned", str(tmp_path / "tuned.safetensors"), "--rank", "4",
                 "--model-config-dir", str(cfg_dir), "--out", str(tmp_path / "extracted.safetensors")]) == 0
    original, extracted = read_lora(loras[0]), read_lora(tmp_path / "extracted.safetensors")
    assert set(extracted.modules) == set(original.modules)
    for name, m in original.modules.items():
        torch.testing.assert_close(extracted.modules[name].delta(), m.delta(), atol=1e-4, rtol=0)


def test_llm_extract_merge_and_formats(tiny_llama, tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--base", str(tiny_llama), "--lora", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    assert main(["extract", "--base", str(tiny_llama), "--tuned", str(tmp_path / "merged"), "--rank", "4",
                 "--out", str(tmp_path / "extracted")]) == 0
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    ids = torch.tensor([[1, 200, 3000, 45]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                             str(tmp_path / "extracted"))(input_ids=ids).logits
    assert float((merged - reloaded).abs().max()) <= 1e-4
    # a PEFT adapter round-trips through the tools bit-exactly, and has no kohya form
    convert(tmp_path / "adapter", tmp_path / "again", "peft")
    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(LoraFormatError, match="has no kohya form"):
        convert(tmp_path / "adapter", tmp_path / "k.safetensors", "kohya")


def test_lycoris_is_recognised_and_refused_precisely(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
              tmp_path / "loha.safetensors")
    assert main(["inspect", str(tmp_path / "loha.safetensors")]) == 2
    assert "a LyCORIS file (LoHa/LoKr/...)" in capsys.readouterr().err
