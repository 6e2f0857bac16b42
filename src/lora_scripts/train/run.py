"""The run around both training loops, and the optimizer step they share.

`start_accelerator` resolves `mixed_precision: auto` and builds accelerate's Accelerator; `TrainingRun` holds
the output folder's lock, the event stream, the Ctrl-C handler and the NaN guard, and owns the one optimizer
step both loops call (backward, unscale + clip, the overflow/NaN decision, optimizer and scheduler step,
zero-grad, the step event, the stop and save checks) and the checkpoint with its barriers.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.launch import check_distributed_type
from lora_scripts.train.checkpoint import (
    Position,
    data_fingerprint,
    list_checkpoints,
    remove_partial_checkpoints,
    resume_position,
    save_checkpoint,
    torch_rng_states,
)
from lora_scripts.train.common import seed_everything
from lora_scripts.train.errors import TrainingInterrupted, TrainingStopped


class GracefulStop:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop. A second Ctrl-C stops at once.

    Stopping between steps matters: a KeyboardInterrupt inside optimizer.step() could leave half-updated
    weights, and a checkpoint of those would resume a different run.
    """

    def __init__(self, announce=print):
        self.requested: str | None = None
        self._announce = announce
        self._old: dict = {}

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self._announce(f"{self.requested} received: finishing this step and saving a checkpoint "
                       "(press Ctrl-C again to stop at once, without saving)")

    def __exit__(self, *exc) -> None:
        self.restore()


def stop_requested(stop: GracefulStop, accelerator) -> bool:
    """Whether any process was asked to stop (all ranks must agree, or DDP would wait forever)."""
    flag = torch.tensor(1.0 if stop.requested else 0.0, device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag > 0)


def _last_good(out_dir: Path) -> str:
    ckpts = list_checkpoints(out_dir)
    last = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    return f"{last.capitalize()} (resume with resume_from: latest)."


def nan_message(step: int, value: float, cfg: TrainConfig, out_dir: Path) -> str:
    causes = []
    if cfg.mixed_precision == "fp16":
        causes.append("fp16 overflow (try mixed_precision: bf16 or no)")
    causes.append(f"a learning rate too high for this data (learning_rate={cfg.learning_rate:g}; try a third of it)")
    return f"loss became {value} at step {step}; training stopped. Likely causes: {'; '.join(causes)}. {_last_good(out_dir)}"


def overflow_message(step: int, in_a_row: int, scale: float, cfg: TrainConfig, out_dir: Path) -> str:
    return (f"the gradients overflowed fp16 in {in_a_row} steps in a row, up to step {step} (each update was "
            f"skipped and the loss scale lowered, to {scale:g} now); training stopped. Likely causes: values "
            "beyond fp16's range at any scale (try mixed_precision: bf16 where the GPU supports it, or no); a "
            f"learning rate too high for this data (learning_rate={cfg.learning_rate:g}; try a third of it). "
            f"{_last_good(out_dir)}")


class NanGuard:
    """Counts non-finite steps; skips up to cfg.skip_nan_steps of them, then stops with nan_message."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, events):
        self.cfg, self.out_dir, self.events, self.skipped = cfg, out_dir, events, 0

    def bad_step(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when this step must be skipped; raises TrainingStopped once the allowance is used up."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        value = loss if not math.isfinite(loss) else grad_norm
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        self.skipped += 1
        if self.skipped > self.cfg.skip_nan_steps:
            raise TrainingStopped(nan_message(step, value, self.cfg, self.out_dir).replace("loss became", f"{what} became"))
        self.events.emit("warning", step=step, message=f"step {step}: {what} is {value}; update skipped "
                         f"({self.skipped} of skip_nan_steps={self.cfg.skip_nan_steps})")
        return True


OOM_TYPES = (torch.cuda.OutOfMemoryError,)


# How an allocation failure reads: CUDA's "out of memory"; torch's CPU allocator "DefaultCPUAllocator: can't
# allocate memory" (torch 2.x; older: "not enough memory") with "Error code 12 (Cannot allocate memory)".
OOM_PHRASES = ("out of memory", "defaultcpuallocator: can't allocate", "defaultcpuallocator: not enough memory",
               "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, *OOM_TYPES)):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in OOM_PHRASES)


def oom_message(cfg: TrainConfig, family: str) -> str:
    """Concrete settings to try after an out-of-memory error, with values."""
    tips = []
    if cfg.batch_size > 1:
        tips.append(f"batch_size: {cfg.batch_size} -> {cfg.batch_size // 2} with gradient_accumulation_steps: "
                    f"{cfg.gradient_accumulation_steps} -> {cfg.gradient_accumulation_steps * 2} (same effective batch)")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (much less activation memory, ~30% slower)")
    if cfg.mixed_precision == "no":
        tips.append("mixed_precision: bf16 (or fp16 on GPUs without bf16)")
    if family == "llm":
        tips.append(f"max_seq_length: {cfg.max_seq_length} -> {max(64, cfg.max_seq_length // 2)}")
    else:
        tips.append(f"resolution: {cfg.resolution} -> {max(256, cfg.resolution - 128)}")
    if cfg.optimizer == "adamw":
        tips.append("optimizer: adafactor (or adamw8bit with bitsandbytes on CUDA)")
    return "out of memory. Try, in this order:\n  " + "\n  ".join(tips)


# fp16 overflows absorbed in a row before the run stops: loss scaling halves the scale at each one, so ten
# in a row mean the gradients are not finite at any scale (2^16 -> 2^6), not a scale still being found.
MAX_OVERFLOW_SKIPS = 10


def start_accelerator(cfg: TrainConfig):
    """The run's Accelerator, and the config with `mixed_precision: auto` resolved for this machine.

    accelerate keeps its mixed-precision setting in a process-wide singleton; a second train() call in the
    same process (a notebook, a test, a sweep) must be free to choose another precision, so it is reset
    (the distributed state, PartialState, is kept). The scheduler steps once per optimizer step, whether
    or not the step was skipped (accelerate's default steps it once per process, and not after a skip).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lora_scripts.hardware import choose_precision

    precision = choose_precision(cfg.mixed_precision)
    cfg = cfg.model_copy(update={"mixed_precision": precision.name})
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision.name, cpu=precision.device == "cpu",
                              step_scheduler_with_optimizer=False)
    check_distributed_type(str(accelerator.distributed_type.value))
    if precision.name == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        # accelerate runs fp16 on a CPU as plain fp32 with no loss scaling; torch has CPU fp16 autocast and
        # GradScaler, so the same scaled path as on a GPU runs (the preflight refuses fp16 on a CPU for
        # training; this is what lets the fp16 step be tested where there is no GPU).
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return cfg, accelerator


def start_run(cfg: TrainConfig, family: str, callback=None, progress: bool = True) -> TrainingRun:
    """The run of one training call: `with start_run(cfg, "llm") as run:`; `run.cfg` has the precision
    resolved, `run.accelerator` is ready, and the random generators are seeded on entry."""
    cfg, accelerator = start_accelerator(cfg)
    return TrainingRun(cfg, accelerator, family, callback, progress)


class TrainingRun:
    """What every run sets up and tears down around its loop, and the optimizer step both loops share.

    Enter: the output folder's lock (before anything is written), debris of killed checkpoint writes
    removed, the event stream, the Ctrl-C handler (installed by the loop) and the NaN guard. Exit: an
    out-of-memory error becomes TrainingStopped with the settings to change, any other failure an `error`
    event; what the loop entered with `during`, the handler, the stream and the lock are always released.

    In between, a loop `track`s what it trains, then per micro-batch calls `backward` (inside
    `micro_batch`) and per optimizer step `step`: the gradient unscale and clip, the overflow/NaN decision,
    optimizer and scheduler step, zero-grad, the step event, and the stop and save checks live there
    once, for both model families.
    """

    def __init__(self, cfg: TrainConfig, accelerator, family: str, callback=None, progress: bool = True):
        self.cfg, self.accelerator, self.family = cfg, accelerator, family
        self.callback, self.progress = callback, progress
        self.skipped_steps = 0  # updates not applied: fp16 overflows and NaN-guard skips
        self._overflows_in_a_row = 0
        self.last_loss: float | None = None
        self.data: dict | None = None  # the training data's fingerprint, set by resume()
        self.eval_losses: list[tuple[int, float]] = []  # (step, eval loss) of this process's evaluations
        self.last_eval_step: int | None = None
        self.best: dict | None = None  # {"step", "epoch", "eval_loss"} of the lowest eval loss after step 0
        self._tick = time.perf_counter()

    def __enter__(self) -> TrainingRun:
        from lora_scripts.safety import RunLock
        from lora_scripts.train.events import Events

        out_dir = self.out_dir = Path(self.cfg.output_dir)
        self.lock = RunLock(out_dir)
        if self.accelerator.is_main_process:
            self.lock.acquire()  # a second run must not touch this folder
            remove_partial_checkpoints(out_dir)  # half-written by a killed run; never valid
        self.events = Events(out_dir, self.cfg.log_dir, is_main=self.accelerator.is_main_process,
                             callback=self.callback, progress=self.progress)
        self.lock.announce = self.events.print
        self.stop = GracefulStop(self.events.print)
        self.nan_guard = NanGuard(self.cfg, out_dir, self.events)
        self.scoped = contextlib.ExitStack()
        seed_everything(self.cfg.seed)
        return self

    def during(self, context):
        """Enter `context` until the run ends (before the model goes back to the caller)."""
        return self.scoped.enter_context(context)

    # ---- what is trained ------------------------------------------------------------------------------

    def track(self, models: list[torch.nn.Module], state: torch.nn.Module, params: list[torch.nn.Parameter],
              optimizer, scheduler, total_steps: int, export=None, export_best=None, hooks=()) -> None:
        """`models`: the prepared (possibly DDP-wrapped) modules the loop calls; `state`: one module holding
        every trainable part under stable names, for checkpoints; `export(folder)`: the family's own files,
        written into each checkpoint; `export_best()`: the family's best-so-far file (save_best); `hooks`:
        what must see each optimizer step before the gradients are zeroed (AdaLoRA's RankBudget), each with
        `after_update(step, applied)` and a state (`state_file`, `state_dict()`, `load_state_dict()`) that
        checkpoints carry."""
        self.models, self.state, self.params = models, state, params
        self.optimizer, self.scheduler, self.total_steps, self.export = optimizer, scheduler, total_steps, export
        self.export_best = export_best
        self.hooks = list(hooks)

    def resume(self, data_rows: list) -> Position:
        """Position() for a fresh run, or the restored one of `resume_from`; `data_rows` (JSON-able, one per
        training sample) fingerprint the data, recorded in each checkpoint and compared on resume. Then each
        process draws its own dropout masks: rank r > 0 of a fresh run reseeds its torch generator (rank 0
        keeps the single-process stream); a resumed run has each rank's generator back from the checkpoint."""
        acc = self.accelerator
        self.data = data_fingerprint(data_rows)
        pos, state = resume_position(self.cfg, self.state, self.optimizer, self.scheduler, self.events, acc.scaler,
                                     acc.process_index, self.data, self.hooks)
        self.best = state.get("best")  # the lowest eval so far survives a resume, so save_best stays right
        if pos.step == 0 and acc.process_index > 0:
            torch.manual_seed(self.cfg.seed + 1_000_003 * acc.process_index)
        return pos

    def save_config(self) -> None:
        """The resolved config (auto precision and sniffed model type filled in) beside the outputs."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.out_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")

    # ---- the step -------------------------------------------------------------------------------------

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are all-reduced across
        processes on a group's last micro-batch only."""
        stack = contextlib.ExitStack()
        if not last:
            for model in self.models:
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        """Backward through accelerate (which scales the loss under fp16) for one of `micro_batches`."""
        self.accelerator.backward(loss / micro_batches)

    def begin_steps(self) -> None:
        """Right before the first step: Ctrl-C/SIGTERM now finish the step and save; the clock starts (the
        base model's eval is not training time)."""
        self.stop.install()
        self._tick = time.perf_counter()

    def record_eval(self, pos: Position, loss: float | None, **figures: float) -> None:
        """An eval loss (None: no eval data) and other figures (the LLM's retention): logged (events,
        TensorBoard, loss_curve.png); the lowest eval loss after some training is remembered as the best,
        and with save_best the family's best file is written now."""
        self.last_eval_step = pos.step
        epochs = pos.epoch + 1 if pos.group > 0 else pos.epoch  # epochs trained (a cut-short one counts)
        if loss is None:
            if figures:
                self.events.emit("eval", step=pos.step, epoch=epochs, **figures)
            return
        self.eval_losses.append((pos.step, loss))
        self.events.emit("eval", step=pos.step, epoch=epochs, eval_loss=loss, **figures)
        if pos.step == 0 or (self.best is not None and loss >= self.best["eval_loss"]):
            return  # step 0 is the base model: the reference, never the best adapter
        self.best = {"step": pos.step, "epoch": epochs, "eval_loss": loss}
        if self.cfg.save_best and self.export_best is not None and self.accelerator.is_main_process:
            self.export_best()
            self.events.emit("info", message=f"save_best: lowest eval loss so far ({loss:.4f}, step {pos.step}) saved")

    def best_summary(self) -> dict:
        """For the end event and the results: where the eval loss was lowest."""
        if self.best is None:
            return {}
        return {"best_step": self.best["step"], "best_epoch": self.best["epoch"], "best_eval_loss": self.best["eval_loss"]}

    def samples_due(self, pos: Position) -> bool:
        """At the end of an epoch: whether `sample_every_n_epochs` asks for samples now. The last epoch's are
        the end of the run's, written after the export (null: only those)."""
        every = self.cfg.sample_every_n_epochs
        return bool(every) and (pos.epoch + 1) % every == 0 and pos.step < self.total_steps

    def next_epoch(self, pos: Position) -> None:
        """After an epoch's eval and samples: every rank is there, the position moves on, and the clock
        restarts (eval and sampling time is not training time)."""
        self.accelerator.wait_for_everyone()
        pos.epoch += 1
        pos.group = 0
        self._tick = time.perf_counter()

    def step(self, pos: Position, loss: torch.Tensor, counts: dict[str, int], rate: str) -> None:
        """One optimizer step after the micro-batches' backward passes, and everything that follows it.

        `loss`: this process's mean loss over the group (a tensor); `counts`: this process's work in the
        step, e.g. {"tokens": n}; `counts[rate]` per second is reported as `<rate>_per_s`. Raises
        TrainingInterrupted after a checkpoint when a stop was asked for, TrainingStopped on a NaN loss (past
        skip_nan_steps) or on more than MAX_OVERFLOW_SKIPS fp16 overflows in a row.
        """
        acc, cfg = self.accelerator, self.cfg
        loss_value = float(acc.reduce(loss.detach().float(), reduction="mean"))  # every rank decides alike
        # Under fp16 clip_grad_norm_ unscales the gradients first, so the norm and the clipping are the true
        # ones. With max_grad_norm null the norm is still measured (an infinite bound clips nothing).
        grad_norm = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf))
        skipped = self._update(pos.step + 1, loss_value, grad_norm)
        for hook in self.hooks:
            hook.after_update(pos.step + 1, applied=not skipped)
        with warnings.catch_warnings():
            # A skipped step still spends its share of the schedule (the plan counts steps, not updates);
            # torch warns when the very first step was skipped, which is loss scaling at work, not a bug.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        pos.group += 1
        elapsed = time.perf_counter() - self._tick
        world = acc.num_processes
        extra = {"loss_scale": acc.scaler.get_scale()} if acc.scaler is not None else {}
        self.events.emit("step", step=pos.step, epoch=pos.epoch, loss=loss_value, lr=self.scheduler.get_last_lr()[0],
                         grad_norm=grad_norm, skipped=skipped, skipped_steps=self.skipped_steps, **extra,
                         **{k: v * world for k, v in counts.items()}, seconds=elapsed,
                         **{f"{rate}_per_s": counts[rate] * world / max(elapsed, 1e-9)})
        self.last_loss = loss_value
        self._tick = time.perf_counter()
        if stop_requested(self.stop, acc):
            raise TrainingInterrupted(self.stop.requested or "SIGINT", self.checkpoint(pos))
        if pos.step % cfg.save_steps == 0 and pos.step < self.total_steps:
            self.checkpoint(pos)

    def _update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Apply the optimizer step, or skip it; True when skipped.

        A NaN/inf loss is the NaN guard's to judge (skip_nan_steps). Without loss scaling a non-finite
        gradient is too. Under fp16 a finite loss with an overflowed gradient is loss scaling at work: the
        scaler skips the update and halves its scale, and training goes on.
        """
        scaler = self.accelerator.scaler
        if not math.isfinite(loss) or (scaler is None and not math.isfinite(grad_norm)):
            self.nan_guard.bad_step(step, loss, grad_norm)  # raises once the allowance is used up
            if scaler is not None:
                scaler.update()  # this step's unscale is forgotten (and the scale backs off)
            self.skipped_steps += 1
            return True
        self.optimizer.step()
        if scaler is None or not self.optimizer.step_was_skipped:
            self._overflows_in_a_row = 0
            return False
        self.skipped_steps += 1
        self._overflows_in_a_row += 1
        if self._overflows_in_a_row > MAX_OVERFLOW_SKIPS:
            raise TrainingStopped(overflow_message(step, self._overflows_in_a_row, scaler.get_scale(), self.cfg,
                                                   self.out_dir))
        return True

    def checkpoint(self, pos: Position) -> Path | None:
        """Every rank has finished the step before the main process saves it, and none goes on (or exits)
        before the folder is complete. Each rank's torch generator goes into the checkpoint."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        rng_ranks = gather_object([torch_rng_states()]) if acc.num_processes > 1 else None
        path = None
        if acc.is_main_process:
            path = save_checkpoint(self.out_dir, pos, self.state, self.optimizer, self.scheduler, self.cfg,
                                   self.export, keep=self.cfg.save_total_limit, scaler=acc.scaler,
                                   rng_ranks=rng_ranks, record={"data": self.data, "best": self.best},
                                   hook_states={h.state_file: h.state_dict() for h in self.hooks})
            self.events.emit("checkpoint", step=pos.step, path=str(path))
        acc.wait_for_everyone()
        return path

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and is_oom(exc):
                self.events.emit("error", message="out of memory")
                raise TrainingStopped(oom_message(self.cfg, self.family)) from None
            if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.events.emit("error", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            self.scoped.close()
            self.stop.restore()
            self.events.close()
            self.lock.release()
        return False

