"""The drift signal of an LLM run: how far training has moved the model from its general behaviour.

A LoRA trained long on a narrow dataset keeps the voice it was taught but pulls every answer toward the
data's topic (asked how to make rice less sticky, a model tuned on household-care answers says "Clean it
with a brush and warm water"), and neither the train loss nor an eval loss on held-out samples of the same
data shows it. So at the start of a run the base model answers a small shipped set of general questions
(greedy, short, cached per base model), and after every epoch the tuned model's mean loss on those answers
is reported as `retention`: lower is closer to the base. It rises as the model drifts; the run warns once
when it passes DRIFT_FACTOR x the base model's own figure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_scripts.atomic import write_text_atomic
from lora_scripts.data import text as textdata
from lora_scripts.models.embedded import cache_root

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "resources" / "drift_prompts.txt"
MAX_NEW_TOKENS = 48  # enough for the start of an answer, where the topic shows; short keeps it cheap
# Warn when the tuned model's loss on the base's answers passes this many times the base's own. Measured on
# the demo (SmolLM2-135M, 120 house-style pairs, docs/performance.md): the 3-epoch demo ends at 1.86x with
# answers still on topic; the same data over 8 epochs reads 2.02x, 2.14x, 2.16x, 2.24x, 2.25x, 2.26x after
# epochs 3-8 while its eval loss is lowest after epoch 4, and the persona starts leaking into unrelated
# answers ("Harbor seals" in a haiku about the sea). 2.2 warns at epoch 6 there, two epochs past the best.
# One dataset: a starting point, not a law.
DRIFT_FACTOR = 2.2


def drift_prompts() -> list[str]:
    lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _cache_file(weights_folder: Path, prompts: list[str]) -> Path:
    """Keyed by the base model's files (path, size, mtime), the prompts and the reply length."""
    folder = Path(weights_folder).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    key = json.dumps([str(folder), files, prompts, MAX_NEW_TOKENS])
    return cache_root() / "drift" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def base_replies(model, tokenizer, weights_folder: Path, prompts: list[str]) -> list[str]:
    """The base model's greedy answers to `prompts` (read from the cache when this base answered before).
    `model` must behave as the base: a fresh adapter (B = 0) or one disabled by the caller."""
    from lora_scripts.llm_generate import generate_replies

    cached = _cache_file(weights_folder, prompts)
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    replies = [r.text for r in generate_replies(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)]
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, json.dumps(replies))
    return replies


@dataclass
class DriftCheck:
    data: list[textdata.Tokenized]  # (general prompt, the base model's answer), tokenized as training data
    base: float  # the base model's own loss on them: the reference
    warned: bool = False

    @classmethod
    def prepare(cls, peft_model, tokenizer, weights_folder: Path, max_seq_length: int,
                loss_of: Callable[[list[textdata.Tokenized]], float], autocast, as_base=None) -> DriftCheck:
        """The answers and the base's figure, with the model as the base (right for a resumed run too):
        `as_base()` is a context in which it is, by default the adapter switched off (PiSSA/OLoRA runs, whose
        frozen weights are the residual, pass their initial adapter put back instead). `autocast`: the run's
        (accelerator.autocast): under mixed precision the frozen weights are kept in bf16/fp16, so the
        answers are generated the way the loss is computed."""
        prompts = drift_prompts()
        with (as_base or peft_model.disable_adapter)():
            with autocast():
                replies = base_replies(peft_model, tokenizer, weights_folder, prompts)
            samples = [textdata.Sample(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                       for p, r in zip(prompts, replies)]
            data, _ = textdata.tokenize_all(tokenizer, samples, max_seq_length)
            base = loss_of(data)
        return cls(data, base)

    def measure(self, loss_of: Callable[[list[textdata.Tokenized]], float], step: int, events) -> dict[str, float]:
        """The retention figure now, for the eval event; a warning the first time it passes the factor."""
        value = loss_of(self.data)
        if not self.warned and step > 0 and value > DRIFT_FACTOR * self.base:
            self.warned = True
            events.emit("warning", message=(
                f"step {step}: retention {value:.3f} is {value / self.base:.1f}x the base model's {self.base:.3f}: "
                "answers to general questions are drifting toward the training data. If the samples show it, "
                "use fewer epochs or a lower learning_rate, add more varied data, or keep an earlier epoch "
                "with save_best: true (and val_ratio)"))
        return {"retention": value, "retention_base": self.base}
