"""`python -m lora_scripts.ui.runner EXIT_FILE LOG_FILE -- COMMAND...`: run a job's command and record its exit.

The job store starts this in a session of its own and is not its parent after a UI restart, so it cannot
learn the trainer's exit code itself: this runner waits for the command (output to LOG_FILE) and writes the
code to EXIT_FILE. It ignores SIGINT, which the store sends to the whole group to stop a job: the trainer
saves a checkpoint and exits, and the runner stays to record that it did.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from lora_scripts.atomic import write_text_atomic


def main(argv: list[str]) -> int:
    exit_file, log_file, sep, *command = argv
    if sep != "--" or not command:
        print("usage: python -m lora_scripts.ui.runner EXIT_FILE LOG_FILE -- COMMAND...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(log_file, "ab", buffering=0) as log:
        # the trainer gets SIGINT's default handling back (its own handler saves and stops)
        code = subprocess.call(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    write_text_atomic(Path(exit_file), str(code))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
