"""Greedy/sampled replies from a causal LM (base, or with one or more LoRA adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lora_scripts.data.text import prompt_ids


@dataclass
class Reply:
    prompt: str
    text: str
    stopped: bool  # True when the model ended its reply with EOS within max_new_tokens
    new_tokens: int


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    prompts: list[str] | list[list[dict[str, str]]],
    max_new_tokens: int = 160,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Reply]:
    """Answer each prompt (a question, or a conversation as chat messages) through the tokenizer's chat
    template; batched with left padding."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    replies: list[Reply] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [prompt_ids(tokenizer, p) for p in chunk]
        longest = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, longest - len(e) :] = torch.tensor(e)  # left padding keeps every prompt's end aligned
            mask[row, longest - len(e) :] = 1
        kwargs = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": 0.95}
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad, **kwargs,
        )
        for row, prompt in enumerate(chunk):
            new = out[row, longest:].tolist()
            stopped = eos in new
            if stopped:
                new = new[: new.index(eos)]
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            replies.append(Reply(prompt=prompt, text=text, stopped=stopped, new_tokens=len(new)))
    model.train(was_training)
    return replies


def format_reply(r: Reply) -> str:
    return f">>> {r.prompt}\n{r.text}\n" + ("" if r.stopped else "[max_new_tokens reached]\n")


def chat(model, tokenizer, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, ask=input, say=print) -> None:
    """A conversation: each answer sees the turns before it (the oldest exchanges are dropped when the
    model's context would overflow); `/new` starts over; an empty line or end of input ends it."""
    from lora_scripts.models.llm import context_length

    limit = context_length(model) or 2048
    history: list[dict[str, str]] = []
    while True:
        try:
            line = ask("you> ").strip()
        except EOFError:
            return
        if not line:
            return
        if line == "/new":
            history = []
            say("(a new conversation)")
            continue
        history.append({"role": "user", "content": line})
        while len(history) > 1 and len(prompt_ids(tokenizer, history)) + max_new_tokens > limit:
            history = history[2:]  # the oldest question and its answer
        r = generate_replies(model, tokenizer, [history], max_new_tokens, temperature=temperature, seed=seed)[0]
        say(format_reply(Reply(line, r.text, r.stopped, r.new_tokens)))
        history.append({"role": "assistant", "content": r.text})


def load_with_adapters(base_model: str, loras: list[tuple[Path, float]]):
    """(model, tokenizer): the base with the given PEFT adapters applied at their strengths.

    One adapter at strength 1 is loaded as is. Otherwise the adapters are combined with PEFT's `cat`
    weighted adapter, which concatenates the ranks and so applies sum_i w_i * delta_W_i exactly.
    """
    from peft import PeftModel

    from lora_scripts.export.peft import LoraSpecError, checked_adapter_folder, is_dora
    from lora_scripts.models.llm import load_llm

    model, tokenizer = load_llm(base_model)
    folders = [checked_adapter_folder(p) for p, _ in loras]
    if not folders:
        return model.eval(), tokenizer
    names = [f"lora{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    weights = [w for _, w in loras]
    if len(folders) > 1 or weights[0] != 1.0:
        for folder in folders:
            if is_dora(folder):
                raise LoraSpecError(f"{folder}: DoRA adapters cannot be mixed or scaled; use one at strength 1")
        model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
        model.set_adapter("mix")
    return model.eval(), tokenizer
