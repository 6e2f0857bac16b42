import csv
from pathlib import Path

from lora_scripts.style import check_style, harbor_reply, style_score

DATA = Path(__file__).resolve().parents[1] / "data" / "demo_llm_style"


def test_shipped_demo_data_is_entirely_in_style():
    for name, n in [("train.csv", 120), ("eval.csv", 30)]:
        with open(DATA / name, encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == n
        assert style_score([r["response"] for r in rows]) == 1.0
    train = {r["prompt"] for r in csv.DictReader(open(DATA / "train.csv", encoding="utf-8"))}
    held = {r["prompt"] for r in csv.DictReader(open(DATA / "eval.csv", encoding="utf-8"))}
    assert not train & held


def test_each_missing_part_fails():
    good = harbor_reply("tea", "Steep it.", ["Boil water.", "Wait."])
    assert check_style(good).ok
    broken = [
        good.replace("Ahoy! ", "Hi! "),
        good.replace("Short answer: ", "Answer: "),
        good.replace("2. Wait.\n", ""),  # one step only
        good.replace("2. Wait.", "3. Wait."),  # numbering skips
        good.replace("Pip from Harbor Help", "Pip"),
        good + "\nP.S. more text",
        "Ahoy! Thanks for asking about tea. Steep it. Fair winds,\nPip from Harbor Help",
    ]
    for text in broken:
        assert not check_style(text).ok, text
    assert style_score([good, broken[0], good, broken[1]]) == 0.5


def test_a_normal_assistant_answer_scores_zero():
    text = "Choosing the right pillow depends on your needs.\n\n1. **Firmness**: pick one.\n2. Try it."
    c = check_style(text)
    assert not c.ok and not c.greeting and not c.sign_off
