"""The decode queries' sketch projections in the fused decode kernel's bit order, as fp16 high and low parts.

``kernels.decode_attention`` takes the products of sign bit ``i`` of every packed byte ``j`` (sketch row ``8 j + i``)
one bit position at a time, so it reads ``S q`` with its columns permuted to ``i * BP + j`` (``BP`` the bytes a key
takes, padded to a power of two) and, for its fp16 tensor cores, split into ``hi + lo`` (``~2^-22`` of fp32). One
program per (batch, KV head) does this once per decode step, for the ``M`` queries of that KV head.

Reference: ``q @ S.T`` (``qjl.sketch.QJLSketch``), permuted as ``sketch_tables`` permutes ``S``.
"""

import torch
import triton
import triton.language as tl

from .common import pow2, split_fp16

PROJECT_COLUMNS = 64  # projection columns per step


@triton.jit
def project_kernel(q_ptr, sp_hi_ptr, sp_lo_ptr, tables_ptr, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                   WIDTH: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``bh``: ``q @ S_perm`` ``[M_PAD, WIDTH]`` for the queries of one KV head, written as fp16 high and low
    parts ``tables[bh, 0 | 1, m, c]`` (rows from ``M`` on are zeros). ``sp_*``: ``S`` in bit order, ``[D, WIDTH]``
    (``sketch_tables``)."""
    bh = tl.program_id(0)
    rows = tl.arange(0, M_PAD)
    for c_start in range(0, WIDTH, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        proj = tl.zeros((M_PAD, BLOCK_C), dtype=tl.float32)
        for d_start in tl.static_range(0, D, 16):
            offs_d = d_start + tl.arange(0, 16)
            q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                        mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            s_hi = tl.load(sp_hi_ptr + offs_d[:, None] * WIDTH + offs_c[None, :], mask=offs_d[:, None] < D, other=0.0)
            s_lo = tl.load(sp_lo_ptr + offs_d[:, None] * WIDTH + offs_c[None, :], mask=offs_d[:, None] < D, other=0.0)
            q_hi, q_lo = split_fp16(q)
            proj += tl.dot(q_hi, s_hi) + tl.dot(q_lo, s_hi) + tl.dot(q_hi, s_lo)
        hi, lo = split_fp16(proj)
        out = tables_ptr + (bh * 2 * M_PAD + rows[:, None]) * WIDTH + offs_c[None, :]
        tl.store(out, hi)
        tl.store(out + M_PAD * WIDTH, lo)


def launch_config(queries: int, head_dim: int, sketch_dim: int) -> dict:
    """The constexprs (and warps) for these shapes; also what ``kernels-compile`` checks."""
    width = 8 * pow2(sketch_dim // 8, 16)
    return dict(M=queries, M_PAD=pow2(queries, 16), D=head_dim, WIDTH=width, BLOCK_C=min(PROJECT_COLUMNS, width),
                num_warps=4)


def sketch_tables(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sketch ``[m, d]`` as the kernels read it: ``T[c, i * BP + j] = S[8 j + i, c]`` (``BP`` the byte count
    padded to a power of two, zero where ``8 j + i >= m``), fp16 high and low parts (``hi + lo`` is the fp32 matrix to
    ~2^-22), ``[d, 8 BP]`` each. Made once per matrix and kept on it (sketches are never written)."""
    cached = getattr(matrix, "_kernel_tables", None)
    if cached is None or cached[0] != matrix._version:
        m, d = matrix.shape
        bp = pow2(m // 8, 16)
        padded = matrix.new_zeros(8 * bp, d, dtype=torch.float32)
        padded[:m] = matrix.float()
        # row 8 j + i -> column i * bp + j
        table = padded.reshape(bp, 8, d).permute(2, 1, 0).reshape(d, 8 * bp).contiguous()
        hi = table.half()
        cached = (matrix._version, hi, (table - hi.float()).half())
        matrix._kernel_tables = cached
    return cached[1], cached[2]


def project_queries(q: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``q`` ``[BH, M, d]`` (the queries of each KV head), sketch ``matrix`` ``[m, d]``: fp16 ``[BH, 2, M_PAD, 8 BP]``,
    the high and low parts of ``q @ S.T`` with its columns in bit order (zeros past ``m``) and zero rows past ``M``."""
    bh, queries, d = q.shape
    if matrix.shape[1] != d:
        raise ValueError(f"sketch matrix {tuple(matrix.shape)} does not match head dim {d}")
    config = launch_config(queries, d, matrix.shape[0])
    hi, lo = sketch_tables(matrix)
    tables = q.new_empty(bh, 2, config["M_PAD"], config["WIDTH"], dtype=torch.float16)
    project_kernel[(bh,)](q.contiguous(), hi, lo, tables, **config)
    return tables
