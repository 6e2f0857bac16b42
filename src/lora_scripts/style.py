"""The demo's "Harbor Help" house style: how a reply is written, and a strict checker for it.

A reply in the style is:

    Ahoy! Thanks for asking about <topic>.

    Short answer: <one sentence>

    Try this:
    1. <tip>
    2. <tip>

    Fair winds,
    Pip from Harbor Help

The checker looks for each part, in this order; a reply scores only when every part is there. The base
model never writes this by chance, so the score measures what the LoRA taught.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GREETING = "Ahoy! Thanks for asking about "
SHORT = "Short answer: "
TRY = "Try this:"
SIGN_OFF = "Fair winds,\nPip from Harbor Help"


def harbor_reply(topic: str, answer: str, tips: list[str]) -> str:
    steps = "\n".join(f"{i}. {tip}" for i, tip in enumerate(tips, start=1))
    return f"{GREETING}{topic}.\n\n{SHORT}{answer}\n\n{TRY}\n{steps}\n\n{SIGN_OFF}"


_PATTERN = re.compile(
    r"^Ahoy! Thanks for asking about (?P<topic>[^\n]+?)\.\n+"
    r"Short answer: (?P<answer>[^\n]+)\n+"
    r"Try this:\n(?P<steps>(?:\d+\. [^\n]+\n)+)\n*"
    r"Fair winds,\nPip from Harbor Help$"
)


@dataclass
class StyleCheck:
    greeting: bool
    short_answer: bool
    numbered_steps: bool
    sign_off: bool
    exact_layout: bool

    @property
    def ok(self) -> bool:
        return self.exact_layout


def check_style(text: str) -> StyleCheck:
    """Each part of the house style, and whether the whole reply has exactly the house layout."""
    text = text.strip()
    m = _PATTERN.match(text)
    steps_ok = False
    if m:
        numbers = [int(line.split(".", 1)[0]) for line in m.group("steps").strip().split("\n")]
        steps_ok = len(numbers) >= 2 and numbers == list(range(1, len(numbers) + 1))
    return StyleCheck(
        greeting=text.startswith(GREETING),
        short_answer=SHORT in text,
        numbered_steps=bool(re.search(r"Try this:\n1\. .+\n2\. .+", text)),
        sign_off=text.endswith(SIGN_OFF),
        exact_layout=bool(m) and steps_ok,
    )


def style_score(texts: list[str]) -> float:
    """Fraction of replies that follow the house style completely."""
    return sum(check_style(t).ok for t in texts) / len(texts) if texts else 0.0
