"""LoRA fine-tuning of a causal LLM: one plain loop.

Data order is a pure function of (seed, epoch), and a checkpoint stores (step, epoch, group) with the
adapter, optimizer, scheduler and RNG states, so a resumed run continues with the very next batch and
reproduces an uninterrupted run.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_scripts.config import TrainConfig
from lora_scripts.data import text as textdata
from lora_scripts.data.split import split_eval
from lora_scripts.export.peft import write_llm_adapter
from lora_scripts.llm_generate import generate_replies
from lora_scripts.models import packed_attention
from lora_scripts.models.llm import (
    context_length,
    load_llm,
    lora_config_for,
    resolve_llm_path,
    restore_frozen_linears,
    save_initial_adapter,
    store_frozen_linears_in,
)
from lora_scripts.train.adalora import RankBudget
from lora_scripts.train.checkpoint import replace_folder
from lora_scripts.train.chunked_ce import linear_cross_entropy
from lora_scripts.train.common import (
    build_optimizer,
    build_scheduler,
    frozen_weights_dtype,
    lora_inputs_uncast,
    lora_param_groups,
    weights_swapped,
)
from lora_scripts.train.drift import DriftCheck
from lora_scripts.train.events import adapter_title, plot_loss_curve, whole_run
from lora_scripts.train.plan import plan_steps
from lora_scripts.train.run import start_run

# peft still calls a transformers property that warns on every model load; it is not the user's concern.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    trained_model: object = None  # as trained: after mixed precision its frozen linears are bf16/fp16
    tokenizer: object = None
    weights_folder: Path | None = None  # where restore_frozen_linears reads the exact fp32 weights back
    skipped_steps: int = 0  # updates not applied (fp16 overflows absorbed by loss scaling, NaN-guard skips)

    @property
    def model(self):
        """The trained PeftModel with its fp32 base weights, for callers that go on using it in-process.

        Read back from the model files on first use when training kept the frozen weights in bf16/fp16:
        a run from the command line never pays for it (time, and ~2x the weights' memory).
        """
        if self.weights_folder is not None:
            restore_frozen_linears(self.trained_model, self.weights_folder)
            self.weights_folder = None
        return self.trained_model


# Causal LMs whose logits are exactly lm_head(final hidden state): no bias, scaling or soft-capping after the
# head (Gemma2's soft-capping, Granite's and Cohere's logit scaling are left to transformers).
PLAIN_HEAD_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "starcoder2", "olmo", "olmo2"}


@contextmanager
def head_left_out(core):
    """Let the (unwrapped) model return the hidden states its LM head would see instead of logits."""
    head = core.get_output_embeddings()
    core.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        core.set_output_embeddings(head)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labelled tokens, and their count.

    Only positions that carry a label go through the LM head (`logits_to_keep`): the vocabulary
    projection is a large share of a small model's compute, and prompt tokens need no logits. Where the
    head is a plain projection, the loss is taken chunk by chunk without materialising the logits
    (train/chunked_ce.py: the same numbers within 1e-5, tested).
    """
    labels = batch["shift_labels"]  # (B, T), already shifted: labels[:, t] is the token after t
    labelled = (labels != textdata.IGNORE_INDEX).any(dim=0)  # (T,)
    # The kept positions are rounded up to the shape multiple (see shape_multiple) with the first few
    # unlabelled ones: their targets are all ignored, so they change no number.
    unlabelled = ~labelled
    fill = min(-int(labelled.sum()) % shape_multiple(labels.device), int(unlabelled.sum()))
    filler = unlabelled & (unlabelled.cumsum(0) <= fill)
    keep = (labelled | filler).nonzero().squeeze(-1)  # (K,)
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    target = labels[:, keep]
    count = int((target != textdata.IGNORE_INDEX).sum())
    core = getattr(model, "module", model)  # under DDP the model is wrapped
    if (getattr(core.config, "model_type", "") in PLAIN_HEAD_ARCHITECTURES
            and getattr(core.get_output_embeddings(), "bias", None) is None):
        with head_left_out(core) as head:
            hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, hidden size)
        return linear_cross_entropy(hidden, head.weight, target) / max(count, 1), count
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=textdata.IGNORE_INDEX)
    return loss, count


def supports_packing(model) -> bool:
    """Packed rows need the model to build its mask from position_ids (transformers' create_causal_mask)."""
    arch = getattr(model.config, "model_type", "")
    return arch in {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite",
                    "smollm3", "starcoder2"}


def shape_multiple(device) -> int:
    """Token counts are rounded up to this multiple (with filler that carries no label).

    On the CPU, oneDNN compiles a bf16 matmul kernel for every new (rows, in, out) shape: about 3 ms each,
    measured with torch 2.13 (a 456 x 1536 x 576 matmul: 1.2 ms with a seen row count, 4.3 ms with a new
    one). Packed rows have a new length nearly every step, so every linear layer paid that, forward and
    backward: 6% of a SmolLM2 step. Multiples of 32 leave a handful of shapes for a whole run, for about
    16 filler tokens per row. CUDA has no per-shape cost; 8 keeps tensor-core-friendly sizes.
    """
    return 32 if torch.device(device).type == "cpu" else 8


def make_batch(items: list[textdata.Tokenized], packed: bool, pad_id: int, device) -> dict[str, torch.Tensor]:
    multiple = shape_multiple(device)
    batch = (textdata.collate_packed(items, multiple, pad_id) if packed
             else textdata.collate_padded(items, pad_id, multiple))
    # sample boundaries are read as Python ints by the attention function: on the CPU they cost no sync
    return {k: v if k == "cu_seq_lens_q" else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data: list[textdata.Tokenized], batch_size: int, packed: bool, pad_id: int, accelerator) -> float:
    """Token-weighted mean loss over `data` (every labelled token counts once)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = make_batch(data[i : i + batch_size], packed, pad_id, accelerator.device)
        with accelerator.autocast():
            loss, n = causal_lm_loss(model, batch)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def load_training_data(cfg: TrainConfig) -> tuple[list[textdata.Sample], list[textdata.Sample]]:
    source = cfg.resolved_metadata_path() or cfg.train_data_dir
    if source is None:
        raise textdata.DataError("set metadata_path (a .csv or .jsonl) or train_data_dir (a folder of .txt)")
    samples = textdata.load_samples(Path(source))
    if cfg.eval_data_path is not None:
        return samples, textdata.load_samples(Path(cfg.eval_data_path))
    return split_eval(samples, cfg.val_ratio, cfg.seed)


def tokenize_for(model, tokenizer, train_samples: list[textdata.Sample], eval_samples: list[textdata.Sample],
                 cfg: TrainConfig, events) -> tuple[list[textdata.Tokenized], list[textdata.Tokenized], textdata.TokenStats]:
    """Both sets as token ids with response-only labels; a length past the model's context is an error, and
    truncated samples are counted in a warning."""
    ctx = context_length(model)
    if ctx is not None and cfg.max_seq_length > ctx:
        raise textdata.DataError(f"max_seq_length={cfg.max_seq_length} exceeds the model's context of {ctx} tokens")
    train_data, stats = textdata.tokenize_all(tokenizer, train_samples, cfg.max_seq_length)
    eval_data, _ = textdata.tokenize_all(tokenizer, eval_samples, cfg.max_seq_length)
    if stats.truncated:
        events.emit("warning", message=f"{stats.truncated} of {stats.samples} samples were longer than "
                    f"max_seq_length={cfg.max_seq_length} tokens and were truncated")
    return train_data, eval_data, stats


@dataclass
class Adapter:
    model: object  # the PeftModel
    weights_folder: Path  # the base model's files
    cast_frozen: bool  # frozen linears kept in the autocast dtype (store_frozen_linears_in)
    budget: RankBudget | None = None  # AdaLoRA's rank schedule
    initial: Path | None = None  # PiSSA/OLoRA: the adapter as initialised, on disk for the export's conversion
    start: dict[str, torch.Tensor] | None = None  # and in memory: with it in place the model is the base


def attach_adapter(cfg: TrainConfig, model, run, total_steps: int) -> Adapter:
    """The run's adapter on the frozen model (gradient checkpointing first, where asked), peft's input casts
    off while the run lasts, the frozen linears in the training dtype where that is exact."""
    from peft import get_peft_model

    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config_for(cfg, model, total_steps))
    budget = RankBudget(model.base_model) if cfg.lora_type == "adalora" else None
    # PiSSA/OLoRA: the start is saved before a resume loads trained weights into it
    initial = run.out_dir / "initial_adapter" if cfg.mutates_base else None
    start = save_initial_adapter(model, initial, run.accelerator.is_main_process) if initial else None
    run.during(lora_inputs_uncast(model, cfg.mixed_precision))
    frozen_dtype = frozen_weights_dtype(cfg)
    weights_folder = resolve_llm_path(cfg.base_model, log=run.events.print)
    cast = frozen_dtype is not None and store_frozen_linears_in(model, frozen_dtype, weights_folder)
    return Adapter(model, weights_folder, cast, budget, initial, start)


def train_llm(cfg: TrainConfig, callback=None, progress: bool = True) -> TrainResult:
    with start_run(cfg, "llm", callback, progress) as run:  # mixed_precision: auto resolved for this machine
        cfg, accelerator, events, out_dir = run.cfg, run.accelerator, run.events, run.out_dir
        rank, world = accelerator.process_index, accelerator.num_processes

        # ---- data first: its errors must come before the slow model load -----------------------
        train_samples, eval_samples = load_training_data(cfg)
        model, tokenizer = load_llm(cfg.base_model, log=events.print)
        train_data, eval_data, stats = tokenize_for(model, tokenizer, train_samples, eval_samples, cfg, events)
        packed = supports_packing(model)
        if packed:  # attend within each packed sample alone rather than through a whole-row mask
            model.set_attn_implementation(packed_attention.register())
        pad_id = tokenizer.pad_token_id

        plan = plan_steps(len(train_data), cfg, world)
        if plan.batches_per_rank == 0:
            raise textdata.DataError(f"{len(train_data)} samples cannot fill one batch of {cfg.batch_size} "
                                     f"on each of {world} processes")
        batches_per_rank, steps_per_epoch, total_steps, epochs = (
            plan.batches_per_rank, plan.steps_per_epoch, plan.total_steps, plan.epochs)

        # ---- adapter, optimizer, schedule --------------------------------------------------------
        adapter = attach_adapter(cfg, model, run, total_steps)
        model, budget, weights_folder = adapter.model, adapter.budget, adapter.weights_folder
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = build_optimizer(cfg, lora_param_groups(named, cfg.learning_rate, cfg.loraplus_lr_ratio))
        scheduler = build_scheduler(cfg, optimizer, total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        core = accelerator.unwrap_model(model)

        def export_adapter(folder: Path) -> None:
            write_llm_adapter(core, folder, adapter.initial)

        run.track([model], core, params, optimizer, scheduler, total_steps, export_adapter,
                  export_best=lambda: replace_folder(out_dir / "best", export_adapter), hooks=[budget] if budget else [])
        pos = run.resume([[s.text, s.messages] for s in train_samples])

        n_trainable = sum(p.numel() for p in params)
        events.emit(
            "start", step=pos.step, total_steps=total_steps, epochs=epochs, steps_per_epoch=steps_per_epoch,
            train_samples=len(train_data), eval_samples=len(eval_data), trainable_params=n_trainable,
            packed=packed, processes=world, precision=cfg.mixed_precision, trained_tokens=stats.trained_tokens,
            padding_fraction_if_padded=round(textdata.padding_fraction(
                [[train_data[i] for i in b] for b in textdata.epoch_batches(len(train_data), cfg.batch_size, cfg.seed, 0)]), 4),
        )
        events.print(f"training {n_trainable:,} LoRA parameters on {len(train_data)} samples: {total_steps} steps, "
                     f"{steps_per_epoch} per epoch, {'packed' if packed else 'padded'} batches of {cfg.batch_size}")
        run.save_config()

        def loss_of(data: list[textdata.Tokenized]) -> float:
            return evaluate(model, data, cfg.batch_size, packed, pad_id, accelerator)

        as_base = (lambda: weights_swapped(core, adapter.start)) if adapter.start else None  # PiSSA/OLoRA
        drift = DriftCheck.prepare(core, tokenizer, weights_folder, cfg.max_seq_length, loss_of, accelerator.autocast,
                                   as_base) if cfg.drift_check else None

        def run_eval() -> None:  # the eval loss (with eval data) and the drift signal (train/drift.py)
            figures = drift.measure(loss_of, pos.step, events) if drift else {}
            run.record_eval(pos, loss_of(eval_data) if eval_data else None, **figures)

        if pos.step == 0:
            run_eval()  # the base model's eval loss: the reference the tuned model is judged against
        sample_prompts = cfg.sample_prompts or [s.messages[-2]["content"] for s in eval_samples[:3] if s.messages]

        # ---- the loop ------------------------------------------------------------------------------
        events.start_progress(total_steps, pos.step, desc=f"training {cfg.name}")
        model.train()
        run.begin_steps()
        while pos.step < total_steps:
            all_batches = textdata.epoch_batches(len(train_data), cfg.batch_size, cfg.seed, pos.epoch)
            mine = all_batches[: batches_per_rank * world][rank::world]
            groups = [mine[i : i + cfg.gradient_accumulation_steps]
                      for i in range(0, len(mine), cfg.gradient_accumulation_steps)]
            for group in groups[pos.group :]:
                group_loss = torch.zeros((), device=accelerator.device)
                tokens = filler = 0
                for micro, indices in enumerate(group):
                    items = [train_data[i] for i in indices]
                    batch = make_batch(items, packed, pad_id, accelerator.device)
                    real = sum(len(t) for t in items)
                    tokens += real  # real tokens; the filler of make_batch is counted on its own
                    filler += int(batch["input_ids"].numel()) - real
                    with run.micro_batch(last=micro == len(group) - 1), accelerator.autocast():
                        loss, _ = causal_lm_loss(model, batch)
                        run.backward((loss + budget.penalty()) if budget else loss, len(group))
                    group_loss += loss.detach() / len(group)
                run.step(pos, group_loss, {"tokens": tokens, "filler_tokens": filler}, rate="tokens")
                if pos.step >= total_steps:
                    break
            if pos.group >= len(groups):  # the epoch is complete
                run_eval()
                if run.samples_due(pos) and accelerator.is_main_process and sample_prompts:
                    write_samples(core, tokenizer, sample_prompts, cfg, pos, events, out_dir, accelerator)
                run.next_epoch(pos)

        # ---- export ----------------------------------------------------------------------------------
        if run.last_eval_step != pos.step:
            run_eval()  # max_train_steps ended mid-epoch: still report where the run finished
        run.checkpoint(pos)
        if accelerator.is_main_process:
            export_adapter(out_dir)
            if sample_prompts:
                write_samples(core, tokenizer, sample_prompts, cfg, pos, events, out_dir, accelerator, final=True)
            plot_loss_curve(whole_run(out_dir / "events.jsonl"), out_dir / "loss_curve.png", f"{cfg.name}: {adapter_title(cfg)}")
            if budget:
                events.emit("info", message=budget.summary())
            events.emit("end", step=pos.step, final_loss=run.last_loss, skipped_steps=run.skipped_steps,
                        precision=cfg.mixed_precision, adapter=str(out_dir / "adapter_model.safetensors"),
                        **run.best_summary())
        accelerator.wait_for_everyone()
        # Without accelerate's autocast wrapper, so the caller gets the plain fp32 model that was saved.
        plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        return TrainResult(out_dir, out_dir, pos.step, run.last_loss, run.eval_losses, events.history, plain, tokenizer,
                           weights_folder if adapter.cast_frozen else None, run.skipped_steps)


def write_samples(model, tokenizer, prompts, cfg, pos, events, out_dir: Path, accelerator, final: bool = False) -> None:
    """Replies to the sample prompts, appended to samples.md under the epoch (or the end of the run)."""
    with accelerator.autocast():
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
    lines = [f"## {'end of training' if final else f'epoch {pos.epoch + 1}'}, step {pos.step}\n"]
    for i, r in enumerate(replies):
        events.emit("sample", step=pos.step, index=i, prompt=r.prompt, text=r.text, stopped=r.stopped)
        lines.append(f"### {r.prompt}\n{r.text}\n{'' if r.stopped else '[did not stop within max_new_tokens]'}\n")
    with open(out_dir / "samples.md", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
