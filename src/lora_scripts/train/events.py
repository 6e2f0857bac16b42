"""One stream of structured training events, read by every front end.

A loop calls `events.emit("step", step=..., loss=...)`; the stream appends it to `events.jsonl` in the
run folder, writes TensorBoard scalars/text, moves the progress bar and calls the user's callback. No
front end reaches into the loop. Only the main process writes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# Which fields of which events become TensorBoard scalars, and under which tag.
SCALARS = {
    "step": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
             "tokens_per_s": "speed/tokens_per_s", "images_per_s": "speed/images_per_s"},
    "eval": {"eval_loss": "eval/loss", "retention": "eval/retention"},
}


class Events:
    def __init__(
        self,
        run_dir: Path,
        log_dir: Path | None,
        is_main: bool = True,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
    ):
        self.is_main = is_main
        self.callback = callback
        self.history: list[dict] = []
        self._bar: tqdm | None = None
        self._progress = progress and is_main
        self._jsonl = None
        self._tb = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "events.jsonl", "a", encoding="utf-8")
            if log_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(log_dir))

    def emit(self, kind: str, **data: Any) -> dict:
        event = {"event": kind, "time": round(time.time(), 3), **data}
        self.history.append(event)
        if not self.is_main:
            return event
        assert self._jsonl is not None
        # arrays (sample images) go to TensorBoard, not into the JSON log
        self._jsonl.write(json.dumps({k: v for k, v in event.items() if not hasattr(v, "shape")}, default=str) + "\n")
        self._jsonl.flush()
        step = data.get("step", 0)
        if self._tb is not None:
            for field, tag in SCALARS.get(kind, {}).items():
                if data.get(field) is not None:
                    self._tb.add_scalar(tag, data[field], step)
            if kind == "sample" and "text" in data:
                self._tb.add_text(f"samples/{data.get('index', 0)}", f"**{data['prompt']}**\n\n{data['text']}", step)
            if kind == "image" and "image" in data:
                self._tb.add_image(data.get("tag", "samples"), data["image"], step, dataformats="HWC")
        if kind == "step" and self._bar is not None:
            self._bar.n = data["step"]
            post = {"loss": f"{data['loss']:.4f}", "lr": f"{data['lr']:.2e}"}
            for speed in ("tokens_per_s", "images_per_s"):
                if data.get(speed) is not None:
                    post[speed.replace("_per_s", "/s")] = f"{data[speed]:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
        elif kind in ("warning", "error", "info", "checkpoint", "eval"):
            self.print(_describe(event))
        if self.callback is not None:
            self.callback(event)
        return event

    def print(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def start_progress(self, total: int, initial: int, desc: str) -> None:
        if self._progress:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _describe(event: dict) -> str:
    kind = event["event"]
    if kind == "eval":
        figures = [f"{name} {event[key]:.4f}" for key, name in (("eval_loss", "eval loss"), ("retention", "retention"))
                   if key in event]
        return f"[eval] step {event.get('step')}, after {event.get('epoch')} epoch(s): {', '.join(figures)}"
    if kind == "checkpoint":
        return f"[checkpoint] step {event.get('step')}: {event.get('path')}"
    return f"[{kind}] {event.get('message', '')}"


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}


def adapter_title(cfg) -> str:
    """The adapter in a few words, for plot titles: `LoRA r=8`, `AdaLoRA r=12->8`."""
    if cfg.lora_type == "adalora":
        init_r, target_r = cfg.adalora_ranks
        return f"AdaLoRA r={init_r}->{target_r}"
    return f"{ADAPTER_NAMES[cfg.lora_type]} r={cfg.lora_rank}"


def whole_run(events_file: Path) -> list[dict]:
    """Every event of a run from its events.jsonl, resumed parts included: a resume goes on from its
    checkpoint, so what the earlier run logged after that step (lost with the kill) is left out."""
    found: list[dict] = []
    for line in Path(events_file).read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["event"] == "start" and event.get("step"):
            found = [e for e in found if e.get("step") is None or e["step"] <= event["step"]]
        found.append(event)
    return found


def plot_loss_curve(history: list[dict], path: Path, title: str) -> Path | None:
    """Train loss per step (raw and smoothed), eval loss and retention (the drift signal) per epoch, as a PNG."""
    steps = [(e["step"], e["loss"]) for e in history if e["event"] == "step"]
    evals = [(e["step"], e["eval_loss"]) for e in history if e["event"] == "eval" and "eval_loss" in e]
    retention = [(e["step"], e["retention"]) for e in history if e["event"] == "eval" and "retention" in e]
    if not steps and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if steps:
        xs, ys = zip(*steps)
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1, label="train loss (per step)")
        window = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
                  for i in range(len(ys))]
        ax.plot(xs, smooth, color="tab:blue", linewidth=2, label=f"train loss (mean of {window})")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="tab:orange", linewidth=2, label="eval loss")
    if retention:
        xs, ys = zip(*retention)
        ax.plot(xs, ys, "s--", color="tab:green", linewidth=1.5,
                label="retention (loss on the base's general answers; rising = drift)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
