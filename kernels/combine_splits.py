"""Merges flash-decoding partial results: per query row, ``sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s``."""

import torch
import triton
import triton.language as tl

from .common import pow2

BLOCK_SPLITS = 16


@triton.jit
def combine_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, n_splits, M: tl.constexpr,
                          D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program ``(bh, row)``: partial max and sum ``[BH, S, M]`` (log2 units), output ``[BH, S, M, D]``."""
    bh, row = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    m_run = tl.full((), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((D_PAD,), dtype=tl.float32)
    for start in range(0, n_splits, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        ok = s < n_splits
        parts = (bh * n_splits + s) * M + row
        m = tl.load(part_m_ptr + parts, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weight = tl.exp2(m - m_safe)  # 0 for empty splits (m = -inf)
        alpha = tl.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(weight * tl.load(part_l_ptr + parts, mask=ok, other=0.0), axis=0)
        block = tl.load(part_acc_ptr + parts[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D),
                        other=0.0)
        acc = acc * alpha + tl.sum(weight[:, None] * block, axis=0)
        m_run = m_new
    tl.store(out_ptr + (bh * M + row) * D + offs_d, (acc / l_run).to(out_ptr.dtype.element_ty), mask=offs_d < D)


def launch_config(head_dim: int) -> dict:
    return dict(D=head_dim, D_PAD=pow2(head_dim, 16), BLOCK_S=BLOCK_SPLITS)


def combine_splits(part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor, dtype: torch.dtype):
    """``[BH, S, M]`` maxima and sums and ``[BH, S, M, D]`` outputs -> ``[BH, M, D]`` of ``dtype``."""
    bh, splits, m, d = part_acc.shape
    out = part_acc.new_empty(bh, m, d, dtype=dtype)
    combine_splits_kernel[(bh, m)](part_m, part_l, part_acc, out, splits, M=m, **launch_config(d))
    return out
