"""Merges flash-decoding partial results: per query row, ``sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s``."""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .common import COMPILER_OPTIONS, pow2, programmatic_options

# Splits a program takes at once: up to this many it merges them in one step, no loop (at batch 1 the decode kernel
# makes about a hundred a KV head, 133 at eight programs a multiprocessor; on the H100 at cb8154c merging 100 of them
# 16 at a time took 10 us, a fifth of a decode step at 32k tokens).
MAX_BLOCK_SPLITS = 256
# Output columns a program takes, and the partial outputs it holds at once (splits times columns: 32 floats a thread
# of four warps), so that a block of splits stays small in registers: more than 128 splits take 16 columns.
BLOCK_COLUMNS = 32
BLOCK_ELEMENTS = 128 * BLOCK_COLUMNS


@triton.jit
def combine_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, n_splits, M: tl.constexpr,
                          ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Program ``(bh, row, column block)``: partial max and sum ``[BH, S, M]`` (log2 units), output
    ``[BH, S, M, D]``, of which the first ``ROWS`` rows go to ``out`` ``[BH, ROWS, D]``. ``PDL``: launched before the
    kernel that writes them has finished."""
    if PDL:
        gdc_wait()
    bh, row, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    m_run = tl.full((), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
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
        block_acc = tl.load(part_acc_ptr + parts[:, None] * D + offs_d[None, :],
                            mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = acc * alpha + tl.sum(weight[:, None] * block_acc, axis=0)
        m_run = m_new
    tl.store(out_ptr + (bh * ROWS + row) * D + offs_d, (acc / l_run).to(out_ptr.dtype.element_ty), mask=offs_d < D)


def launch_config(head_dim: int, splits: int = MAX_BLOCK_SPLITS) -> dict:
    block_splits = min(pow2(splits, 16), MAX_BLOCK_SPLITS)
    return dict(D=head_dim, BLOCK_D=min(BLOCK_COLUMNS, pow2(head_dim, 16), BLOCK_ELEMENTS // block_splits),
                BLOCK_S=block_splits, **COMPILER_OPTIONS)


def combine_splits(part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor, dtype: torch.dtype,
                   pdl: bool = False, rows: int | None = None):
    """``[BH, S, M]`` maxima and sums and ``[BH, S, M, D]`` outputs -> ``[BH, rows, D]`` of ``dtype``, the first
    ``rows`` (all ``M`` by default; the rest are a launch's zero queries); ``pdl``: launched programmatically
    (``kernels.common``), overlapping the end of the kernel that writes them."""
    bh, splits, m, d = part_acc.shape
    rows = m if rows is None else rows
    out = part_acc.new_empty(bh, rows, d, dtype=dtype)
    config = launch_config(d, splits)
    combine_splits_kernel[(bh, rows, triton.cdiv(d, config["BLOCK_D"]))](part_m, part_l, part_acc, out, splits, M=m,
                                                                           ROWS=rows, **config,
                                                                           **programmatic_options(pdl))
    return out
