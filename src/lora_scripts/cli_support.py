"""What every verb module shares: the exit codes, the one-line failure, `--lora PATH[:WEIGHT]` parsing."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def lora_specs(specs: list[str]) -> list[tuple[Path, float]]:
    """`--lora PATH[:WEIGHT]` arguments, parsed once: (path, strength) pairs for the library."""
    from lora_scripts.export.peft import split_weight

    return [(Path(p), w) for p, w in map(split_weight, specs)]
