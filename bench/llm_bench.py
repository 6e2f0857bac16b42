"""One LLM training run, as a subprocess of bench/run.py: ours, the transformers Trainer + PEFT baseline, or
TRL's SFTTrainer with padding-free batches and a completion-only loss (trl 1.16.0, verified here).

All three train SmolLM2-135M-Instruct with LoRA r=8 on q/k/v/o, the same tokenised samples (chat template,
response-only labels), batch size, learning rate, schedule and precision (bf16 autocast where the machine
has bf16 units, fp32 otherwise: bench/run.py chooses and passes it). Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

from lora_scripts.config_file import load_config
from lora_scripts.data import text as td
from lora_scripts.models.llm import load_llm
from lora_scripts.train.llm import causal_lm_loss

STEPS_SKIPPED = 2  # the first steps include one-time setup (allocations, kernel selection)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def autocast(precision: str):
    """The training precision's autocast ("no": fp32, none)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def eval_loss(model, items: list[td.Tokenized], pad_id: int, precision: str) -> float:
    model.eval()
    total = count = 0
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(precision):
        for i in range(0, len(items), 8):
            batch = {k: v.to(device) for k, v in td.collate_padded(items[i : i + 8], pad_id).items()}
            loss, n = causal_lm_loss(model, batch)
            total += float(loss) * n
            count += n
    return total / count


def run_ours(train_file: str, eval_file: str, steps: int, batch: int, out: str, seq: int, precision: str) -> dict:
    from lora_scripts.train.llm import train_llm

    cfg = load_config(None, [
        "base_model=smollm2-135m-instruct", f"metadata_path={train_file}", f"output_dir={out}", f"batch_size={batch}",
        f"max_train_steps={steps}", "learning_rate=2e-4", "scheduler=cosine", f"mixed_precision={precision}",
        f"max_seq_length={seq}", "save_steps=100000", "save_total_limit=1", "lora_rank=8", "lora_alpha=16",
        "sample_prompts=[]", "epochs=1000", "drift_check=false",  # the baselines check nothing of the kind
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
        "eval_loss": eval_loss(result.model, held, tok.pad_token_id, precision), "peak_rss_mb": rss,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepRecord:
    """What a transformers/TRL trainer did at each step: real tokens, token slots (with padding), the time
    between consecutive step ends (data, forward, backward, clipping, optimizer and logging: the span our
    trainer's per-step `seconds` covers) and the logged losses."""

    def __init__(self):
        self.tokens, self.slots, self.times, self.loss, self.last = [], [], [], [], None

    def count(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")  # padding-free batches have none: every slot is a token
        self.tokens.append(int(mask.sum()) if mask is not None else ids.numel())
        self.slots.append(ids.numel())

    def callback(self):
        from transformers import TrainerCallback

        record = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                record.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                record.times.append(now - record.last)
                record.last = now

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    record.loss.append(logs["loss"])

        return StepClock()

    def counted(self, trainer_class):
        record = self

        class Counted(trainer_class):
            def training_step(self, model, inputs, num_items_in_batch=None):
                record.count(inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        return Counted

    def result(self, model, eval_items, pad_id: int, precision: str) -> dict:
        k = STEPS_SKIPPED
        rss = peak_rss_mb()  # of training, as for ours: the eval below is the bench's own measurement
        return {
            "tokens": sum(self.tokens[k:]), "seconds": sum(self.times[k:]), "step_seconds": self.times[k:],
            "final_train_loss": self.loss[-1], "padding_fraction": 1 - sum(self.tokens) / sum(self.slots),
            "eval_loss": eval_loss(model, eval_items, pad_id, precision), "peak_rss_mb": rss,
        }


LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM"}


def hf_args(out: str, batch: int, steps: int, precision: str) -> dict:
    """The TrainingArguments both transformers baselines share with ours."""
    return dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
                lr_scheduler_type="cosine", bf16=precision == "bf16", fp16=precision == "fp16",
                use_cpu=DEVICE == "cpu", logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
                seed=42, disable_tqdm=True, remove_unused_columns=False)


def run_trainer(train_file: str, eval_file: str, steps: int, batch: int, out: str, seq: int, precision: str) -> dict:
    """The standard path: transformers Trainer + PEFT, right-padded batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = load_llm("smollm2-135m-instruct")
    items, _ = td.tokenize_all(tok, td.load_samples(Path(train_file)), seq)
    data = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t)} for t in items]
    model = get_peft_model(model, LoraConfig(**LORA))
    record = StepRecord()
    trainer = record.counted(Trainer)(
        model=model, args=TrainingArguments(**hf_args(out, batch, steps, precision)), train_dataset=data,
        callbacks=[record.callback()], data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    held, _ = td.tokenize_all(tok, td.load_samples(Path(eval_file)), seq)
    return record.result(model, held, tok.pad_token_id, precision)


def run_trl(train_file: str, eval_file: str, steps: int, batch: int, out: str, seq: int, precision: str) -> dict:
    """TRL's SFTTrainer as its docs recommend for speed: padding-free batches (the samples of a batch
    flattened into one row; transformers' SDPA attention keeps them apart through the position ids) and
    the loss on the completion only. Fed the same tokens as the others, pre-tokenised with a completion mask."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tok = load_llm("smollm2-135m-instruct")
    items, _ = td.tokenize_all(tok, td.load_samples(Path(train_file)), seq)
    data = Dataset.from_list([{"input_ids": t.input_ids, "completion_mask": [int(x != -100) for x in t.labels]}
                              for t in items])
    record = StepRecord()
    args = SFTConfig(**hf_args(out, batch, steps, precision), padding_free=True, completion_only_loss=True,
                     max_length=None)  # the samples are already cut to `seq` tokens
    trainer = record.counted(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tok,
                                         peft_config=LoraConfig(**LORA), callbacks=[record.callback()])
    trainer.train()
    held, _ = td.tokenize_all(tok, td.load_samples(Path(eval_file)), seq)
    return record.result(trainer.model, held, tok.pad_token_id, precision)


RUNNERS = {"ours": run_ours, "trainer": run_trainer, "trl": run_trl}


if __name__ == "__main__":
    which, train_file, eval_file, steps, batch, out, seq, precision = sys.argv[1:9]
    res = RUNNERS[which](train_file, eval_file, int(steps), int(batch), out, int(seq), precision)
    if DEVICE == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))
