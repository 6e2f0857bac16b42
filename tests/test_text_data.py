import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_scripts.data import text as td


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_csv_needs_prompt_and_response_columns(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("question,answer\nhi,hello\n")
    with pytest.raises(td.DataError, match=r"needs the columns 'prompt' and 'response' \(found: question, answer\)"):
        td.load_samples(p)


def test_csv_empty_response_names_the_row(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('prompt,response\nhi,hello\n"a, quoted, prompt",\n')
    with pytest.raises(td.DataError, match=r"m.csv:3: empty response"):
        td.load_samples(p)


def test_csv_handles_bom_quotes_and_multiline(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes('\ufeffprompt,response\n"one, two","line 1\nline 2"\n'.encode())
    [s] = td.load_samples(p)
    assert s.messages[-2]["content"] == "one, two" and s.messages[-1]["content"] == "line 1\nline 2"


def test_jsonl_bad_line_names_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(td.DataError, match=r"d.jsonl:3: not valid JSON"):
        td.load_samples(p)


def test_jsonl_shapes(tmp_path):
    rows = [
        {"instruction": "Add", "input": "2+2", "output": "4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"text": "plain text"},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    a, b, c = td.load_samples(p)
    assert a.messages == [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert b.messages[0] == {"role": "system", "content": "Be brief."}
    assert c.text == "plain text"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
    with pytest.raises(td.DataError, match="no non-empty assistant message"):
        td.load_samples(p)


def test_text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "empty.txt").write_text("  ")
    assert [s.text for s in td.load_samples(tmp_path)] == ["first", "second"]


def test_labels_cover_only_replies_and_end_with_eos(tok):
    sample = td.Sample(messages=[
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    ])
    t = td.tokenize_sample(tok, sample, 512)
    trained = [x for x in t.labels if x != td.IGNORE_INDEX]
    assert tok.decode(trained) == "Hello!<|im_end|>4<|im_end|>"
    assert t.input_ids[-1] == tok.eos_token_id and t.labels[-1] == tok.eos_token_id
    # the masked part decodes to the template: system prompt, user turns and role headers
    masked = [i for i, lab in zip(t.input_ids, t.labels) if lab == td.IGNORE_INDEX]
    assert "Hi there" in tok.decode(masked) and "Hello!" not in tok.decode(masked)


def test_plain_text_gets_eos_and_full_labels(tok):
    t = td.tokenize_sample(tok, td.Sample(text="just text"), 64)
    assert t.input_ids[-1] == tok.eos_token_id and t.labels == t.input_ids


def test_truncation_counts_and_prompt_too_long_is_an_error(tok):
    long_reply = td.Sample(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}])
    out, stats = td.tokenize_all(tok, [long_reply, long_reply], max_length=64)
    assert stats.truncated == 2 and all(len(t) == 64 for t in out)
    long_prompt = td.Sample(messages=[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}],
                            origin="data.csv:7")
    with pytest.raises(td.DataError, match=r"data.csv:7: the prompt alone is longer than max_seq_length=64"):
        td.tokenize_sample(tok, long_prompt, 64)


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
    a = td.epoch_batches(10, 3, seed=1, epoch=0)
    assert a == td.epoch_batches(10, 3, seed=1, epoch=0)
    assert a != td.epoch_batches(10, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]


def test_padding_fraction():
    a, b = td.Tokenized([1] * 10, [1] * 10), td.Tokenized([1] * 5, [1] * 5)
    assert td.padding_fraction([[a, b]]) == pytest.approx(0.25)
    assert td.padding_fraction([[a], [b]]) == 0.0


def test_packed_rows_do_not_leak_attention_across_samples(tiny_llama, tok):
    """Logits of samples packed into one row must equal each sample run alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    samples = [td.Sample(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
               for q, a in [("What is 2+2?", "Four."), ("Name a colour", "Blue, like the sea."), ("Hi", "Hello")]]
    items = [td.tokenize_sample(tok, s, 128) for s in samples]
    packed = td.collate_packed(items)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for t in items:
            alone = model(input_ids=torch.tensor([t.input_ids])).logits[0]
            torch.testing.assert_close(together[start : start + len(t)], alone, atol=1e-5, rtol=1e-5)
            start += len(t)
    # and the shifted labels never ask a sample to predict the next sample's first token
    labels = packed["shift_labels"][0].tolist()
    ends = [sum(len(t) for t in items[: i + 1]) - 1 for i in range(len(items))]
    assert all(labels[e] == td.IGNORE_INDEX for e in ends)
