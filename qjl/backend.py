"""Chooses the implementation of the QJL hot paths: Triton kernels (``kernels/``) or the torch reference.

Triton is chosen automatically for CUDA tensors when it imports; ``QJL_BACKEND=torch`` forces the reference and
``QJL_BACKEND=triton`` forces the kernels (on the CPU only under ``TRITON_INTERPRET=1``, Triton's interpreter).
Every function here has the contract of the reference it replaces.
"""

from __future__ import annotations

import functools
import os

import torch

from .keys import QuantizedKeyBlock, quantize_keys as torch_quantize_keys, score_keys
from .values import QuantizedValues, quantize_values as torch_quantize_values

CHOICES = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import kernels  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    choice = os.environ.get("QJL_BACKEND", "").lower()
    if choice and choice not in CHOICES:
        raise ValueError(f"QJL_BACKEND={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("QJL_BACKEND=triton but Triton does not import; pip install triton")
        from kernels.common import interpreting

        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("QJL_BACKEND=triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return tensor.is_cuda and triton_available()


def name(device: torch.device | str) -> str:
    """The backend that tensors on ``device`` get."""
    return "triton" if use_triton(torch.empty(0, device=device)) else "torch"


def quantize_keys(keys, sketch, outlier_sketch=None, idx_per_token=None, mean=None) -> QuantizedKeyBlock:
    if not use_triton(keys):
        return torch_quantize_keys(keys, sketch, outlier_sketch, idx_per_token, mean)
    from kernels.quantize_keys import quantize_keys as kernel

    signs, norms, osigns, onorms, oresiduals = kernel(keys, sketch.matrix,
                                                      outlier_sketch.matrix if outlier_sketch else None,
                                                      idx_per_token, mean)
    return QuantizedKeyBlock(signs, norms, None, osigns, onorms, oresiduals)


def quantize_values(values, bits: int, group_size: int) -> QuantizedValues:
    if not use_triton(values):
        return torch_quantize_values(values, bits, group_size)
    from kernels.quantize_values import quantize_values as kernel

    return QuantizedValues(*kernel(values, bits, group_size))


def compressed_scores(query, block: QuantizedKeyBlock, sketch, outlier_sketch, group_size: int, key_mean=None):
    """``score_keys`` plus ``query . key_mean`` for centred keys: float32 ``[b, h, m, n]``."""
    if not use_triton(query):
        scores = score_keys(query, block, sketch, outlier_sketch, group_size)
        return scores if key_mean is None else scores + query @ key_mean.float().transpose(-1, -2)
    from kernels.scores import compressed_scores as kernel

    return kernel(query, tuple(block), sketch.matrix, outlier_sketch.matrix if outlier_sketch else None, group_size,
                  key_mean)


def decode_arguments(layer, query, scaling: float) -> tuple:
    """The fused decode kernel's arguments for ``query`` against a ``QJLLayer``'s state, in its order."""
    state = layer.state
    values = (state["value_packed"], state["value_scales"], state["value_minimums"])
    return (query, tuple(layer.keys_block()), values, layer.config.value_bits, layer.sketch.matrix,
            layer.outlier_sketch.matrix if layer.outlier_sketch else None, layer.config.group_size, layer.key_mean,
            (layer.sink_keys, layer.buffer_keys), (layer.sink_values, layer.buffer_values), scaling)


def decode_attention(layer, query, attention_mask, scaling: float):
    """The fused kernel for one decode token without a mask (the common decode step), else None (use the
    reference ``attend``). ``layer`` is a ``QJLLayer``; returns ``[b, 1, hq, d]``."""
    if query.shape[2] != 1 or attention_mask is not None or not layer.n_compressed or not use_triton(query):
        return None
    from kernels.decode_attention import decode_attention as kernel

    return kernel(*decode_arguments(layer, query, scaling))
