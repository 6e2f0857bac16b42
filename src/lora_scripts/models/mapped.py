"""Letting go of a memory-mapped model file."""

from __future__ import annotations

import torch


def copy_off_the_file(module: torch.nn.Module, cast_dtype: torch.dtype) -> None:
    """Give every tensor of `module` not in `cast_dtype` memory of its own.

    transformers and diffusers map the weights file into memory, and its pages count against the process
    for as long as any tensor still points into the file. Once the frozen weights are cast to `cast_dtype`
    (new memory), the tensors left (norms, embeddings, buffers, fp32 adapters) would keep the whole file
    mapped; copied, they release it (200 MB of an SD bench run's peak, tested through /proc/self/maps).
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dtype != cast_dtype:
            tensor.data = tensor.data.clone()
