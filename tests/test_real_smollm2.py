"""A few real training steps on the embedded SmolLM2-135M-Instruct: the loss falls, the adapter round-trips."""

import csv

import pytest
import torch
from peft import PeftModel

from lora_scripts.config_file import load_config
from lora_scripts.models.llm import load_llm
from lora_scripts.train.llm import train_llm


@pytest.mark.real_model
def test_smollm2_learns_the_house_style_direction(tmp_path):
    out = tmp_path / "smol"
    # 10 of the 30 held-out pairs: the eval runs twice on a 135M model, the largest part of this test's time
    with open("data/demo_llm_style/eval.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    eval_csv = tmp_path / "eval10.csv"
    with open(eval_csv, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows[:11])
    cfg = load_config(None, [
        "base_model=smollm2-135m-instruct", "metadata_path=data/demo_llm_style/train.csv",
        f"output_dir={out}", "batch_size=2", "max_train_steps=8", "learning_rate=1e-3", "mixed_precision=auto",
        f"eval_data_path={eval_csv}", "max_seq_length=256", "save_steps=100",
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

