"""`lora-scripts ui`: its arguments and the server start; cli.py lists it in its dispatch table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE_SECONDS = 0.5


class UIError(ValueError):
    """The server cannot start as asked (a missing root, a reachable address without a token)."""


def add_ui(p: argparse.ArgumentParser) -> None:
    """serve the web UI over a folder: dataset, config, training jobs that outlive the page, results

    lora-scripts ui --root . --port 7860
    """
    p.add_argument("--root", default=".", help="the folder served: nothing outside it is listed, read or written")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", default=None,
                   help="a secret every request must carry (Authorization: Bearer ...); required off loopback")


def cmd_ui(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise UIError(f"--root {root}: no such folder")
    if args.host not in LOOPBACK and not args.token:
        raise UIError(f"--host {args.host} can be reached from other machines: pass --token SECRET as well; every "
                      "request must then carry it (Authorization: Bearer SECRET)")
    import uvicorn

    from lora_scripts.ui.app import create_app

    where = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
    print(f"lora-scripts ui: serving {root.resolve()} at {where}"
          f"{'?token=...' if args.token else ''} ({'token required' if args.token else 'no token: this machine only'}); "
          "training jobs keep running when this server stops", file=sys.stderr)
    # an open page holds a live event stream: without a limit, stopping the server would wait for the job
    uvicorn.run(create_app(root, args.token), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    return 0
