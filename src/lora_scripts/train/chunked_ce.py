"""Cross-entropy of the LM head's logits without the whole (tokens x vocabulary) logits in fp32.

The usual path (transformers' loss, and ours before this) makes every logit, casts them all to fp32, takes
log_softmax (a second tensor that size) and in backward allocates and fills a third. With long replies
nearly every token is trained: 3,200 tokens x SmolLM2's 49,152-token vocabulary is 630 MB per fp32 tensor,
and measured on the CPU those passes were 40% of a training step. Here the logits are made one chunk of
tokens at a time and reduced to one log-sum-exp per token; backward makes each chunk again and takes its
softmax, the gradient with respect to the logits. Liger Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy do this on CUDA with Triton kernels; neither runs without Triton, hence this plain-torch version.
"""

from __future__ import annotations

import torch

from lora_scripts.data.text import IGNORE_INDEX

CHUNK = 1024  # tokens per matmul: 1024 x 49,152 bf16 logits are a 100 MB transient
# Rows per fp32 pass. A (rows x vocabulary) fp32 buffer that fits in the core's cache: 8 x 49,152 is 1.5 MB.
# Casting a whole chunk to fp32 at once was 6x slower on the CPU, all of it in memory traffic and page faults
# of the fresh 200 MB buffer (measured: 300 tokens, 41 ms -> 7 ms).
ROWS = 8


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, target), targets == -100 ignored.

    The matmul runs in `dtype` (the autocast dtype, or fp32); the log-sum-exp and the loss in fp32, as
    autocast does for the usual path. The softmax of the gradient is taken in the matmul's dtype, which
    is the precision the gradient flows back in anyway: the CPU kernel computes it in fp32 and rounds once.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, dtype: torch.dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = target != IGNORE_INDEX
        index = target.clamp_min(0)  # ignored rows gather some logit and are then multiplied by 0
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        picked = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], CHUNK):
            logits = h[s : s + CHUNK] @ w.T
            picked[s : s + CHUNK] = logits.gather(1, index[s : s + CHUNK, None]).squeeze(1).float()
            for r in range(0, logits.shape[0], ROWS):
                part = logits[r : r + ROWS]
                lse[s + r : s + r + part.shape[0]] = torch.logsumexp(part.float(), dim=-1)
        ctx.save_for_backward(h, w, index, valid, lse, picked)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h, w, index, valid, lse, picked = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        scale = valid * grad_total  # per token; applied to the (tokens x hidden) side, not to the logits
        for s in range(0, h.shape[0], CHUNK):
            rows, end = h[s : s + CHUNK], s + CHUNK
            # d(lse - logit[target]) / d logits = softmax - one_hot; the target's entry from the fp32 lse
            p = torch.softmax(rows @ w.T, dim=-1)
            at = torch.arange(p.shape[0], device=p.device)
            p[at, index[s:end]] = ((picked[s:end] - lse[s:end]).exp() - 1).to(p.dtype)
            if want_h:
                grad_h[s:end] = (p @ w) * scale[s:end, None]
            if want_w:
                grad_w += (p.T @ (rows * scale[s:end, None]).to(rows.dtype)).float()
        return (grad_h.to(ctx.dtypes[0]) if want_h else None, grad_w.to(ctx.dtypes[1]) if want_w else None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of `hidden` (..., H) through a head `weight` (V, H); autocast-aware."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), dtype)
