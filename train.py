#!/usr/bin/env python
"""`python train.py --config configs/my_lora_config.yaml` - the same as `lora-scripts train --config ...`."""

import sys

try:
    from lora_scripts.cli import main
except ImportError as exc:
    sys.exit(f"lora-scripts is not installed in this Python ({exc}).\n"
             "Run ./setup.sh once, then `source .venv/bin/activate` (or use .venv/bin/python).")

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
