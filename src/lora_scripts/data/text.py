"""LLM training data: files → conversations → token ids with response-only labels → packed batches.

Accepted inputs (each error names the file and the row or line):
- `metadata.csv` with `prompt,response` columns (optionally `system`);
- `.jsonl` with one object per line: Alpaca `{"instruction","input","output"}`, chat
  `{"messages":[{"role","content"},...]}`, or plain `{"text"}`;
- a folder of `.txt` files for plain continued training.

Labels: every token that the model should not learn to write (system and user turns, the chat template's
role headers) is -100, so the loss is computed on the assistant's replies only; the end-of-turn / EOS
token *is* labelled so that the tuned model learns to stop.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensors are made only by the collate functions, so reading data needs no torch
    import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset problem the user must fix; the message names the file and row."""


@dataclass
class Sample:
    """One training example: either a conversation or plain text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    origin: str = ""  # "file:line" for error messages


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------


def _conversation(prompt: str, response: str, system: str | None, origin: str) -> Sample:
    if not prompt.strip():
        raise DataError(f"{origin}: empty prompt")
    if not response.strip():
        raise DataError(f"{origin}: empty response; every sample needs the answer the model should learn")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Sample(messages=messages, origin=origin)


def read_csv(path: Path) -> list[Sample]:
    # utf-8-sig drops the byte-order mark that Excel writes; csv handles quoted commas and newlines.
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            if "prompt" not in columns or "response" not in columns:
                raise DataError(
                    f"{path}: an LLM metadata.csv needs the columns 'prompt' and 'response' "
                    f"(found: {', '.join(columns) or 'no header'})"
                )
            samples = []
            for row_no, row in enumerate(reader, start=2):
                origin = f"{path}:{row_no}"
                samples.append(
                    _conversation(row.get("prompt") or "", row.get("response") or "", row.get("system"), origin)
                )
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return samples


def _from_json_object(obj: object, origin: str) -> Sample:
    if not isinstance(obj, dict):
        raise DataError(f"{origin}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{origin}: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{origin}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{origin}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
            clean.append({"role": m["role"], "content": str(m["content"])})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            raise DataError(f"{origin}: no non-empty assistant message, so there is nothing to learn")
        return Sample(messages=clean, origin=origin)
    if "instruction" in obj or "output" in obj:
        instruction = str(obj.get("instruction") or "")
        extra = str(obj.get("input") or "")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _conversation(prompt, str(obj.get("output") or ""), obj.get("system"), origin)
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return _conversation(str(obj["prompt"]), str(obj.get("response", obj.get("completion")) or ""), None, origin)
    if "text" in obj:
        if not str(obj["text"]).strip():
            raise DataError(f"{origin}: empty 'text'")
        return Sample(text=str(obj["text"]), origin=origin)
    raise DataError(
        f"{origin}: unknown record shape with keys {sorted(obj)}; expected 'messages', "
        "'instruction'/'output', 'prompt'/'response' or 'text'"
    )


def read_jsonl(path: Path) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{origin}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            samples.append(_from_json_object(obj, origin))
    return samples


def read_text_folder(folder: Path) -> list[Sample]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    samples = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{p}: not UTF-8 text; save it as UTF-8") from None
        if text.strip():
            samples.append(Sample(text=text, origin=str(p)))
    return samples


def load_samples(path: Path) -> list[Sample]:
    """Read a CSV, JSONL/JSON or a folder of .txt files into samples."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        samples = read_text_folder(path)
    elif path.suffix.lower() == ".csv":
        samples = read_csv(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        samples = read_jsonl(path)
    elif path.suffix.lower() == ".txt":
        samples = [Sample(text=path.read_text(encoding="utf-8"), origin=str(path))]
    else:
        raise DataError(f"{path}: unknown data format; use .csv (prompt,response), .jsonl or a folder of .txt")
    if not samples:
        raise DataError(f"{path}: no samples found")
    return samples


# ---------------------------------------------------------------------------------------------------
# Tokenising with response-only labels
# ---------------------------------------------------------------------------------------------------

FALLBACK_TEMPLATE = "{role}: {content}\n"  # for tokenizers without a chat template (e.g. base models)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = "".join(FALLBACK_TEMPLATE.format(**m) for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids that ask the model for its reply to `prompt` (used for generation)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_sample(tokenizer, sample: Sample, max_length: int) -> Tokenized:
    eos = tokenizer.eos_token_id
    if sample.text is not None:
        ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"] + [eos]
        labels = list(ids)
    else:
        assert sample.messages is not None
        ids, labels = [], []
        # Walk the turns; each assistant turn's tokens (its content up to and including the end-of-turn
        # token) are labelled, everything else is masked. Rendering prefixes keeps the template exact.
        for i, msg in enumerate(sample.messages):
            if msg["role"] != "assistant":
                continue
            before = _render(tokenizer, sample.messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, sample.messages[: i + 1], add_generation_prompt=False)
            if after[: len(before)] != before or before[: len(ids)] != ids:
                raise DataError(f"{sample.origin}: the chat template does not render turns as a stable prefix")
            reply = after[len(before) :]
            # Stop the labels at the end-of-turn token; what follows it (a newline) is template glue.
            if eos in reply:
                reply = reply[: reply.index(eos) + 1]
            else:
                reply = reply + [eos]
            ids += before[len(ids) :]
            labels += [IGNORE_INDEX] * (len(before) - len(labels))
            ids += reply
            labels += reply
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise DataError(
                f"{sample.origin}: the prompt alone is longer than max_seq_length={max_length} tokens, "
                "so no response token would be trained; shorten it or raise max_seq_length"
            )
    return Tokenized(ids, labels, truncated, sample.origin)


@dataclass
class TokenStats:
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    longest: int = 0
    lengths: list[int] = field(default_factory=list)


def tokenize_all(tokenizer, samples: list[Sample], max_length: int) -> tuple[list[Tokenized], TokenStats]:
    out = [tokenize_sample(tokenizer, s, max_length) for s in samples]
    stats = TokenStats(
        samples=len(out),
        tokens=sum(len(t) for t in out),
        trained_tokens=sum(sum(1 for x in t.labels if x != IGNORE_INDEX) for t in out),
        truncated=sum(t.truncated for t in out),
        longest=max((len(t) for t in out), default=0),
        lengths=[len(t) for t in out],
    )
    return out, stats


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same order."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate_packed(items: list[Tokenized], pad_to_multiple_of: int = 1, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pack a batch into one row with no padding (or only up to a multiple of `pad_to_multiple_of`).

    position_ids restart at 0 for every sample and no attention_mask is passed: transformers then builds a
    block-diagonal causal mask from the position resets, so no sample attends to another (tested in
    tests/test_text_data.py against the samples run one by one). `cu_seq_lens_q` holds the sample
    boundaries (0, len1, len1+len2, ...) for models/packed_attention.py, which attends within each
    sample alone instead of through that mask; it stays on the CPU (see make_batch).

    Filler tokens for `pad_to_multiple_of` go right after the shortest sample's last token, as part of its
    segment: causal attention hides them from every real token, they carry no label, so the loss and
    gradients are those of the row without them, and the longest segment (which sets the attention cost)
    grows only if the shortest one outgrows it.
    """
    import torch

    total = sum(len(t) for t in items)
    fill = -total % pad_to_multiple_of
    shortest = min(range(len(items)), key=lambda i: len(items[i]))
    ids, labels, pos, bounds = [], [], [], [0]
    for i, t in enumerate(items):
        extra = fill if i == shortest else 0
        bounds.append(bounds[-1] + len(t) + extra)
        ids += t.input_ids + [pad_id] * extra
        # The first token of each sample has no prediction from its predecessor sample: the model shifts
        # labels left by one, so the label at a boundary would be the next sample's first token.
        labels += t.labels[1:] + [IGNORE_INDEX] * (1 + extra)
        pos += list(range(len(t) + extra))
    return {
        "input_ids": torch.tensor([ids]),
        "shift_labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
        "cu_seq_lens_q": torch.tensor(bounds),
    }


def collate_padded(items: list[Tokenized], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch for models that cannot take packed sequences."""
    import torch

    longest = max(len(t) for t in items)
    longest += -longest % pad_to_multiple_of
    ids = torch.full((len(items), longest), pad_id)
    labels = torch.full((len(items), longest), IGNORE_INDEX)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, t in enumerate(items):
        ids[row, : len(t)] = torch.tensor(t.input_ids)
        labels[row, : len(t) - 1] = torch.tensor(t.labels[1:])
        mask[row, : len(t)] = 1
    return {"input_ids": ids, "shift_labels": labels, "attention_mask": mask}


def padding_fraction(batches: Iterator[list[Tokenized]] | list[list[Tokenized]]) -> float:
    """Share of token slots that would be padding if each batch were right-padded to its longest sample."""
    real = slots = 0
    for b in batches:
        real += sum(len(t) for t in b)
        slots += max(len(t) for t in b) * len(b)
    return 0.0 if slots == 0 else 1.0 - real / slots

