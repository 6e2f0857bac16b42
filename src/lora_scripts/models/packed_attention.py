"""Attention over packed rows at the cost of each sample alone.

A packed row holds several samples back to back (no padding). Left to itself, transformers builds a
block-diagonal mask over the whole row and hands it to SDPA, and the kernel then scores every query of
the row against every key: (sum of lengths)^2 work, none of it skipped by the causal fast path, for
results that are mostly masked away. On the demo data that was a quarter of a CPU training step.

Here the row's sample boundaries travel with the batch (`cu_seq_lens_q`, the name transformers' varlen
flash-attention path uses for the same thing) and each sample attends only to itself with
`is_causal=True`, samples of similar length together in one call as a padded batch (split_into_groups):
about (sum of length^2) / 2 work, the same numbers (tested against the masked path).

Registered with transformers' AttentionInterface (its documented extension point) under `PACKED_SDPA`.
Calls that carry no boundaries (padded batches, generation with a KV cache) go to transformers' own
SDPA function unchanged, so a model switched to this implementation behaves as before everywhere else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_SDPA = "lora_scripts_packed_sdpa"


# Measured with torch 2.13 on a Xeon with AMX (bench notes in the issue-7 closing note): the CPU flash
# attention backward in bf16 costs about as much for a 100-token sample as for a 512-token one, while in
# fp32 it scales with length; fp32 is 2-3x faster up to ~256 tokens per sample and slower beyond.
CPU_FP32_UP_TO = 256
# Cost of one SDPA call, forward and backward, in units of one padded query-key pair (n x L^2 for n samples
# padded to L tokens): about 5e-5 ms per pair at 128-512 tokens (fp32 up to 256, bf16 beyond; SmolLM2's 9
# heads of 64), and per call about 2 ms of fixed cost, gathers and casts included. Measured through this
# module's forward and backward on ten 4-sample rows: 205 ms in single calls, 137 ms split at this cost
# (10,000-80,000 all within 5%); rows of similar lengths stay in one call.
CALL_COST_IN_PAIRS = 40_000


@dataclass(frozen=True)
class Group:
    samples: int
    longest: int
    take: torch.Tensor  # row positions gathered into (samples, longest), each sample's last token repeated


def split_into_groups(lengths: list[int]) -> list[list[int]]:
    """Sample indices in groups that each become one padded SDPA call, at the least estimated cost.

    One call pads every sample to the longest: with lengths 50, 90, 120 and 400 that is 4 x 400^2 pairs,
    3.5x the 185,000 the samples need. Sorted by length, the best split into runs is found exactly (a
    batch has a handful of samples); here {400} and {120, 90, 50}: 2 calls, 203,000 pairs.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[k]: cost of the first k samples (longest first)
    cut = [0] * (len(order) + 1)
    for k in range(1, len(order) + 1):
        for j in range(k):  # samples j..k-1 in one call, padded to the length of sample j
            cost = best[j] + CALL_COST_IN_PAIRS + (k - j) * lengths[order[j]] ** 2
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups, k = [], len(order)
    while k:
        groups.append(order[cut[k] : k])
        k = cut[k]
    return groups[::-1]


@functools.lru_cache(maxsize=8)
def gather_plan(bounds: tuple[int, ...], device: torch.device) -> tuple[list[Group], torch.Tensor]:
    """The groups of a packed row and `keep`, which picks the row's positions, in order, out of the groups'
    outputs laid end to end. Built once per batch rather than once per layer.

    Within a group, row i holds sample i, then its last token repeated: with a causal mask every real query
    sees only real keys of its own sample, and the repeated rows get no gradient.
    """
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    groups, where, base = [], {}, 0
    for members in split_into_groups(lengths):
        longest = max(lengths[i] for i in members)
        take = [starts[i] + min(j, lengths[i] - 1) for i in members for j in range(longest)]
        groups.append(Group(len(members), longest, torch.tensor(take, device=device)))
        for slot, i in enumerate(members):
            where[i] = base + slot * longest
        base += len(members) * longest
    keep = [where[i] + j for i in range(len(lengths)) for j in range(lengths[i])]
    return groups, torch.tensor(keep, device=device)


def per_sample(x: torch.Tensor, g: Group, dtype: torch.dtype) -> torch.Tensor:
    """(1, heads, total, d) -> (samples, heads, longest, d): the group's samples, padded, in `dtype`."""
    rows = x[0].index_select(1, g.take).to(dtype)
    return rows.view(x.shape[1], g.samples, g.longest, x.shape[3]).transpose(0, 1)


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers attention-function signature: q/k/v are (batch, heads, time, head_dim); returns
    (batch, time, heads, head_dim) and no attention weights."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # the boundaries are kept on the CPU by the collator: reading them costs no device sync per layer
    groups, keep = gather_plan(tuple(cu_seq_lens_q.tolist()), query.device)
    outs = []
    for g in groups:
        dtype = torch.float32 if query.device.type == "cpu" and g.longest <= CPU_FP32_UP_TO else query.dtype
        # autocast would cast fp32 inputs back to bf16: the dtype chosen above is the one to run in
        with torch.autocast(query.device.type, enabled=False):
            out = F.scaled_dot_product_attention(per_sample(query, g, dtype), per_sample(key, g, dtype),
                                                 per_sample(value, g, dtype), dropout_p=dropout, is_causal=True,
                                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        outs.append(out.transpose(0, 1).reshape(query.shape[1], -1, query.shape[3]).to(query.dtype))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).index_select(1, keep)  # (heads, total, d)
    return out.transpose(0, 1).unsqueeze(0), None


def register() -> str:
    """Make `PACKED_SDPA` known to transformers (idempotent); returns the name for set_attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # Padded batches still need transformers' SDPA mask; packed ones get a mask too, which is ignored.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
