"""One LLM training run, ours or the transformers Trainer + PEFT baseline, as a subprocess of bench/run.py.

Both train SmolLM2-135M-Instruct with LoRA r=8 on q/k/v/o, the same tokenised samples (chat template,
response-only labels), batch size, learning rate, schedule and precision. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from lora_scripts.config import load_config
from lora_scripts.data import text as td
from lora_scripts.models.llm import load_llm
from lora_scripts.train.llm import causal_lm_loss

STEPS_SKIPPED = 2  # the first steps include one-time setup (allocations, kernel selection)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def eval_loss(model, items: list[td.Tokenized], pad_id: int) -> float:
    model.eval()
    total = count = 0
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for i in range(0, len(items), 8):
            batch = {k: v.to(device) for k, v in td.collate_padded(items[i : i + 8], pad_id).items()}
            loss, n = causal_lm_loss(model, batch)
            total += float(loss) * n
            count += n
    return total / count


def run_ours(train_file: str, eval_file: str, steps: int, batch: int, out: str, seq: int) -> dict:
    from lora_scripts.train.llm import train_llm

    cfg = load_config(None, [
        "base_model=smollm2-135m-instruct", f"metadata_path={train_file}", f"output_dir={out}", f"batch_size={batch}",
        f"max_train_steps={steps}", "learning_rate=2e-4", "scheduler=cosine", "mixed_precision=bf16",
        f"max_seq_length={seq}", "save_steps=100000", "save_total_limit=1", "lora_rank=8", "lora_alpha=16",
        "sample_prompts=[]", "epochs=1000",
    ])
    result = train_llm(cfg, progress=False)
    rss = peak_rss_mb()  # of training; the eval below is the bench's own measurement
    steps_ev = [e for e in result.events if e["event"] == "step"][STEPS_SKIPPED:]
    start = next(e for e in result.events if e["event"] == "start")
    tok = result.tokenizer
    held, _ = td.tokenize_all(tok, td.load_samples(Path(eval_file)), seq)
    return {
        "tokens": sum(e["tokens"] for e in steps_ev), "seconds": sum(e["seconds"] for e in steps_ev),
        "step_seconds": [e["seconds"] for e in steps_ev], "final_train_loss": steps_ev[-1]["loss"],
        # the filler that rounds packed rows up to a multiple of 32 tokens (train/llm.py: shape_multiple)
        "padding_fraction": sum(e["filler_tokens"] for e in steps_ev) / sum(e["tokens"] + e["filler_tokens"] for e in steps_ev),
        "padding_fraction_if_padded": start["padding_fraction_if_padded"],
        "eval_loss": eval_loss(result.model, held, tok.pad_token_id), "peak_rss_mb": rss,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trainer(train_file: str, eval_file: str, steps: int, batch: int, out: str, seq: int) -> dict:
    """The standard path: transformers Trainer + PEFT, right-padded batches, bf16 autocast."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tok = load_llm("smollm2-135m-instruct")
    items, _ = td.tokenize_all(tok, td.load_samples(Path(train_file)), seq)
    data = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t)} for t in items]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    record = {"tokens": [], "slots": [], "times": [], "loss": [], "last": None}

    class Counted(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            record["tokens"].append(int(mask.sum()))
            record["slots"].append(mask.numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        """Time between consecutive step ends: data, forward, backward, clipping, optimizer and logging,
        the same span our trainer's per-step `seconds` covers."""

        def on_train_begin(self, args, state, control, **kw):
            record["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            record["times"].append(now - record["last"])
            record["last"] = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record["loss"].append(logs["loss"])

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", bf16=True, use_cpu=DEVICE == "cpu", logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=42, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Counted(model=model, args=args, train_dataset=data, callbacks=[StepClock()],
                    data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    rss = peak_rss_mb()
    held, _ = td.tokenize_all(tok, td.load_samples(Path(eval_file)), seq)
    k = STEPS_SKIPPED
    return {
        "tokens": sum(record["tokens"][k:]), "seconds": sum(record["times"][k:]), "step_seconds": record["times"][k:],
        "final_train_loss": record["loss"][-1], "padding_fraction": 1 - sum(record["tokens"]) / sum(record["slots"]),
        "eval_loss": eval_loss(model, held, tok.pad_token_id), "peak_rss_mb": rss,
    }


if __name__ == "__main__":
    which, train_file, eval_file, steps, batch, out, seq = sys.argv[1:8]
    fn = run_ours if which == "ours" else run_trainer
    res = fn(train_file, eval_file, int(steps), int(batch), out, int(seq))
    if DEVICE == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))
