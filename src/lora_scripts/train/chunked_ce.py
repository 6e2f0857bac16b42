"""Cross-entropy of the LM head's logits without the whole (tokens x vocabulary) logits in fp32.

The usual path (transformers' loss, and ours before this) makes every logit, casts them all to fp32, takes
log_softmax (a second tensor that size) and in backward allocates and fills a third. With long replies
nearly every token is trained: 3,200 tokens x SmolLM2's 49,152-token vocabulary is 630 MB per fp32 tensor,
and measured on the CPU those passes were 40% of a training step. Here the logits are made one chunk of
tokens at a time and reduced to one log-sum-exp per token; backward makes each chunk again and turns it
into the gradient in place. Liger Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy do
this on CUDA with Triton kernels; neither runs without Triton, hence this plain-torch version.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK = 1024  # tokens per chunk: 1024 x 49,152 fp32 logits are a 200 MB transient


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, target), targets == -100 ignored.

    The matmul runs in `dtype` (the autocast dtype, or fp32), everything after it in fp32, as autocast does
    for the usual path.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, dtype: torch.dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = target != IGNORE_INDEX
        index = target.clamp_min(0)  # ignored rows gather some logit and are then multiplied by 0
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], CHUNK):
            logits = (h[s : s + CHUNK] @ w.T).float()
            lse[s : s + CHUNK] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, index[s : s + CHUNK, None]).squeeze(1)
            total += ((lse[s : s + CHUNK] - picked) * valid[s : s + CHUNK]).sum()
        ctx.save_for_backward(h, w, index, valid, lse)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h, w, index, valid, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        for s in range(0, h.shape[0], CHUNK):
            rows = h[s : s + CHUNK]
            # d(lse - logit[target]) / d logits = softmax - one_hot, computed in place in the logits' buffer
            p = (rows @ w.T).float().sub_(lse[s : s + CHUNK, None]).exp_()
            p[torch.arange(p.shape[0], device=p.device), index[s : s + CHUNK]] -= 1
            p.mul_((valid[s : s + CHUNK] * grad_total)[:, None])
            p = p.to(h.dtype)
            if want_h:
                grad_h[s : s + CHUNK] = p @ w
            if want_w:
                grad_w += (p.T @ rows).float()
        return (grad_h.to(ctx.dtypes[0]) if want_h else None, grad_w.to(ctx.dtypes[1]) if want_w else None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of `hidden` (..., H) through a head `weight` (V, H); autocast-aware."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), dtype)
