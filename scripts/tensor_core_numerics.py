"""Triton's interpreter with the tensor cores' rounding emulated: what a kernel's fp16 products would give on a GPU
whose numerics are one of a few hypotheses, on a machine with no GPU.

The interpreter computes ``tl.dot`` of fp16 or bf16 operands exactly (numpy, float32 sums), so it cannot show what
the tensor cores' own arithmetic does. Here each such dot into a float32 accumulator runs as the block fused
multiply-adds of the H100's ``mma`` as a published numerical model of its tensor cores describes them
(github.com/north-numerical-computing/MATLAB-tensor-core, ``H100TC.m``; the model is theirs, this code is not): 16
exact products and the accumulator aligned to the largest exponent among them, kept to 2 bits below fp32's
precision with truncation toward zero, the sum truncated to fp32, subnormal inputs kept. ``TC_RULE`` adds one
hypothesis on top:

- ``model`` (the default): the model as it is;
- ``flush-pairs``: products of two fp16 subnormals (both operands under 2^-14) are zero;
- ``flush-below:T``: products under 2^-T are zero.

Integer products stay exact. Triton on a GPU may fold ``acc + tl.dot(a, b)`` into the product's accumulator; the
interpreter adds after it, so the truncation here sees fresh partial sums where a GPU may see the running one.

As a pytest plugin (``tests/test_kernels.py`` runs the interpreter off a GPU)::

    TC_RULE=flush-pairs PYTHONPATH=scripts python -m pytest -q -p tensor_core_numerics tests/test_kernels.py -k fp32

As a script, from a checkout's root (an earlier commit's too, in a worktree): the largest difference of the fused
decode from the torch reference on ``test_fused_decode_matches_reference_attend``'s cases, by name::

    TC_RULE=model python path/to/scripts/tensor_core_numerics.py 256-2-fp32 64-3-fp32
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton's own functions are decorated, at its import

import numpy as np  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

PRODUCTS_PER_BLOCK = 16  # an fp16 mma's depth: one block fused multiply-add
GUARD_BITS = 2
FP16_SMALLEST_NORMAL = 2.0 ** -14
RULE = os.environ.get("TC_RULE", "model")
exact_dot = interpreter.InterpreterBuilder.create_dot


def truncated_fp32(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` to fp32's 24 significant bits, toward zero (as float64; fp32's subnormal range is not needed)."""
    significand, exponent = np.frexp(x)
    return np.ldexp(np.trunc(np.ldexp(significand, 24)), exponent - 24)


def products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a[m, k] * b[k, n]`` as float64 ``[m, k, n]`` (exact for fp16 operands), less what ``RULE`` drops."""
    prod = a[:, :, None] * b[None, :, :]
    if RULE == "flush-pairs":
        prod[(np.abs(a[:, :, None]) < FP16_SMALLEST_NORMAL) & (np.abs(b[None, :, :]) < FP16_SMALLEST_NORMAL)] = 0.0
    elif RULE.startswith("flush-below:"):
        prod[np.abs(prod) < 2.0 ** -int(RULE.split(":")[1])] = 0.0
    elif RULE != "model":
        raise ValueError(f"unknown TC_RULE {RULE!r}: model, flush-pairs or flush-below:T")
    return prod


def block_fma_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc + a @ b`` (``a`` ``[m, k]``, ``b`` ``[k, n]`` fp16/bf16, ``acc`` fp32) as a chain of block fused
    multiply-adds of ``PRODUCTS_PER_BLOCK`` products each."""
    a, b, total = a.astype(np.float64), b.astype(np.float64), acc.astype(np.float64)
    for k in range(0, a.shape[1], PRODUCTS_PER_BLOCK):
        terms = np.concatenate([products(a[:, k:k + PRODUCTS_PER_BLOCK], b[k:k + PRODUCTS_PER_BLOCK]),
                                total[:, None, :]], axis=1)
        largest = np.abs(terms).max(axis=1, keepdims=True)
        _, exponent = np.frexp(np.where(largest > 0, largest, 1.0))  # largest < 2^exponent
        quantum = np.ldexp(1.0, exponent - 24 - GUARD_BITS)
        total = truncated_fp32((np.trunc(terms / quantum) * quantum).sum(axis=1))
    return total.astype(np.float32)


def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype.is_floating() and a.dtype.primitive_bitwidth == 16 and d.data.dtype == np.float32:
        if a.data.ndim != 2:
            raise NotImplementedError("batched dots are not emulated")
        return interpreter.TensorHandle(block_fma_dot(a.data, b.data, d.data), d.dtype.scalar)
    return exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


interpreter.InterpreterBuilder.create_dot = create_dot


def main():
    import dataclasses
    import sys

    sys.path.insert(0, os.getcwd())
    import torch

    from qjl.config import QJLConfig
    from tests.test_kernels import DTYPES, filled_layer

    cases = {  # test_fused_decode_matches_reference_attend's fp32 cases and the benchmark's bf16 path
        "64-3-fp32": (64, 3, "fp32", dataclasses.replace(QJLConfig.preset("3bit", head_dim=64), sketch_dim=120,
                                                         exact_outliers=True)),
        "128-3-fp32": (128, 3, "fp32", QJLConfig(sketch_dim=136, outlier_sketch_dim=40, n_outliers=5, group_size=16,
                                                 value_bits=4, value_group_size=64, buffer_size=48, sink_tokens=3,
                                                 center_keys=True)),
        "256-2-fp32": (256, 2, "fp32", QJLConfig.preset("3bit", head_dim=256)),
        "128-4-bf16": (128, 4, "bf16", QJLConfig.preset("3bit", head_dim=128)),
    }
    for name in sys.argv[1:] or cases:
        d, group, dtype, config = cases[name]
        layer = filled_layer(config, 2, 2, d, prompt=235, steps=2, dtype=DTYPES[dtype])
        query = torch.randn(2, 2 * group, 1, d, generator=torch.Generator().manual_seed(3)).to(DTYPES[dtype])
        os.environ["QJL_BACKEND"] = "torch"
        ref = layer.attend(query, None, d ** -0.5).float()
        os.environ["QJL_BACKEND"] = "triton"
        out = layer.attend(query, None, d ** -0.5).float()
        print(f"TC_RULE={RULE} {name}: max |fused - reference| {(out - ref).abs().max().item():.3g} "
              f"(outputs up to {ref.abs().max().item():.3g})", flush=True)


if __name__ == "__main__":
    main()
