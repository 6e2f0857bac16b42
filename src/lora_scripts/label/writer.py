"""The metadata writer: a prompt from a sentence and phrases, and the atomic CSV write."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def compose_prompt(sentence: str | None, phrases: list[str], trigger: str | None) -> str:
    parts = ([trigger] if trigger else []) + ([sentence] if sentence else []) + phrases
    seen, out = set(), []
    for p in parts:  # a phrase the sentence already holds is not repeated
        if p and p.lower() not in seen and not (sentence and p.lower() in sentence.lower() and p != sentence):
            seen.add(p.lower())
            out.append(p)
    return ", ".join(out)


def write_csv_atomic(path: Path, rows: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "prompt"])
    for name, prompt in rows.items():
        w.writerow([name, prompt])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
