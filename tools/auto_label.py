#!/usr/bin/env python
"""`python tools/auto_label.py --input DIR --output CSV` - the same as `lora-scripts label ...`."""

import sys

try:
    from lora_scripts.cli import main
except ImportError as exc:
    sys.exit(f"lora-scripts is not installed in this Python ({exc}).\n"
             "Run ./setup.sh once, then `source .venv/bin/activate` (or use .venv/bin/python).")

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
