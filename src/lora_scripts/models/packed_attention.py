"""Attention over packed rows at the cost of each sample alone.

A packed row holds several samples back to back (no padding). Left to itself, transformers builds a
block-diagonal mask over the whole row and hands it to SDPA, and the kernel then scores every query of
the row against every key: (sum of lengths)^2 work, none of it skipped by the causal fast path, for
results that are mostly masked away. On the demo data that was a quarter of a CPU training step.

Here the row's sample boundaries travel with the batch (`cu_seq_lens_q`, the name transformers' varlen
flash-attention path uses for the same thing) and each sample attends only to itself with
`is_causal=True`, all samples in one call as a padded batch: (samples x longest^2) / 2 work, the same
numbers (tested against the masked path).

Registered with transformers' AttentionInterface (its documented extension point) under `PACKED_SDPA`.
Calls that carry no boundaries (padded batches, generation with a KV cache) go to transformers' own
SDPA function unchanged, so a model switched to this implementation behaves as before everywhere else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACKED_SDPA = "lora_scripts_packed_sdpa"


# Measured with torch 2.13 on a Xeon with AMX (bench notes in the issue-7 closing note): the CPU flash
# attention backward in bf16 costs about as much for a 100-token sample as for a 512-token one, while in
# fp32 it scales with length; fp32 is 2-3x faster up to ~256 tokens per sample and slower beyond.
CPU_FP32_UP_TO = 256


@functools.lru_cache(maxsize=8)
def gather_plan(bounds: tuple[int, ...], device: torch.device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(samples, longest, take, keep) for a packed row, built once per batch rather than once per layer.

    Row i of the padded batch holds sample i, then its last token repeated: with a causal mask every real
    query sees only real keys of its own sample, and the repeated rows get no gradient. `take` gathers the
    row's tokens into that batch; `keep` picks the real positions back out of it.
    """
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    longest = max(lengths)
    take = torch.tensor([s + min(j, n - 1) for s, n in zip(bounds, lengths) for j in range(longest)], device=device)
    keep = torch.tensor([i * longest + j for i, n in enumerate(lengths) for j in range(n)], device=device)
    return len(lengths), longest, take, keep


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers attention-function signature: q/k/v are (batch, heads, time, head_dim); returns
    (batch, time, heads, head_dim) and no attention weights."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # the boundaries are kept on the CPU by the collator: reading them costs no device sync per layer
    samples, longest, take, keep = gather_plan(tuple(cu_seq_lens_q.tolist()), query.device)
    dtype = torch.float32 if query.device.type == "cpu" and longest <= CPU_FP32_UP_TO else query.dtype

    def per_sample(x: torch.Tensor) -> torch.Tensor:  # (1, heads, total, d) -> (samples, heads, longest, d)
        rows = x[0].index_select(1, take).to(dtype)
        return rows.view(x.shape[1], samples, longest, x.shape[3]).transpose(0, 1)

    # autocast would cast fp32 inputs back to bf16: the dtype chosen above is the one to run in
    with torch.autocast(query.device.type, enabled=False):
        out = F.scaled_dot_product_attention(per_sample(query), per_sample(key), per_sample(value),
                                             dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    out = out.transpose(0, 1).reshape(query.shape[1], -1, query.shape[3]).index_select(1, keep)  # (heads, total, d)
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None


def register() -> str:
    """Make `PACKED_SDPA` known to transformers (idempotent); returns the name for set_attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # Padded batches still need transformers' SDPA mask; packed ones get a mask too, which is ignored.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
