"""Compressed attention scores of decode queries against packed QJL keys, grouped-query aware.

Reference: ``qjl.keys.score_keys`` (plus ``q . mean`` for centred keys). One program serves one (batch, KV head) and
a contiguous range of tokens; it projects its ``M`` queries (the query heads of that KV head, never repeated keys)
by the sketch once into a scratch row of its own, then per tile of tokens takes ``<S q, sign(S k)>`` on tensor cores
one ``BLOCK_SKETCH`` slice of the sketch at a time (reloading the projection slice, unpacking that slice's sign bits),
so registers and shared memory do not grow with the sketch or head dim. With outliers a tile is one token group:
the group's ``K`` outlier channels move from the inlier projection to the outlier one,
``S (q * mask) = S q - S[:, idx] q[idx]``; with exact outliers (``EXACT``, no outlier sketch) the whole ``S q``
scores the signs and the outlier part is ``q[idx] . outlier_residuals`` (``qjl.keys``' docstring).
"""

import torch
import triton
import triton.language as tl

from .common import COMPILER_OPTIONS, dot3, dot_exact_rhs, multiprocessors, pow2, sketch_scale, unpack_rows

BLOCK_TOKENS = 32  # tile without outliers; with outliers a tile is one token group
BLOCK_SKETCH = 64  # sketch slice scored at a time
MIN_TOKENS_PER_PROGRAM = 256  # amortises the query projection each program does
PROGRAMS_PER_SM = 2  # programs per multiprocessor a split aims at


@triton.jit
def load_queries(q_ptr, bh, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    rows = tl.arange(0, M_PAD)
    offs_d = tl.arange(0, D_PAD)
    return tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                   mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def project(q_ptr, s_ptr, proj_ptr, bh, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
            SKETCH: tl.constexpr, BLOCK_S: tl.constexpr):
    """Writes ``q @ S^T`` float32 ``[M, SKETCH]`` at ``proj_ptr`` (this program's scratch), in ``[M_PAD, BLOCK_S]``
    tiles over 32-channel slices of the head dim, then waits for every thread of the program to have written."""
    rows = tl.arange(0, M_PAD)
    for start in range(0, SKETCH, BLOCK_S):  # loops, not unrolled: one tile and one slice of S live at a time
        offs_s = start + tl.arange(0, BLOCK_S)
        proj = tl.zeros((M_PAD, BLOCK_S), dtype=tl.float32)
        for d_start in range(0, D, 32):
            offs_d = d_start + tl.arange(0, 32)
            q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                        mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            s_t = tl.load(s_ptr + offs_s[None, :] * D + offs_d[:, None],
                          mask=(offs_s[None, :] < SKETCH) & (offs_d[:, None] < D), other=0.0)
            proj += dot3(q, s_t)
        tl.store(proj_ptr + rows[:, None] * SKETCH + offs_s[None, :], proj,
                 mask=(rows[:, None] < M) & (offs_s[None, :] < SKETCH))
    tl.debug_barrier()  # the tiles are read back by other threads of this program


@triton.jit
def gathered_projection(q_out, s_ptr, idx, offs_s, SKETCH: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                        K_PAD: tl.constexpr):
    """``q[idx] @ S[offs_s, idx]^T``: the outlier channels' share of a projection slice, ``[M_PAD, BLOCK_S]``."""
    offs_k = tl.arange(0, K_PAD)
    s_idx = tl.load(s_ptr + offs_s[None, :] * D + idx[:, None],
                    mask=(offs_k[:, None] < K) & (offs_s[None, :] < SKETCH), other=0.0)
    return dot3(q_out, s_idx)


@triton.jit
def sign_dot(proj, signs_ptr, rows, ok, start, SKETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """``<proj, sign(S k)>`` over sketch rows ``start .. start + BLOCK_S`` for the tile's tokens (global token rows
    ``rows``): ``[M_PAD, BLOCK_N]``."""
    offs_b = start // 8 + tl.arange(0, BLOCK_S // 8)
    packed = tl.load(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :],
                     mask=ok[:, None] & (offs_b[None, :] < SKETCH // 8), other=0)
    signs = unpack_rows(packed, BLOCK_N, BLOCK_S // 8) * 2 - 1  # padding columns meet zero projections
    return dot_exact_rhs(proj, tl.trans(signs))


@triton.jit
def exact_outlier_scores(q_out, oresiduals_ptr, rows, ok, K: tl.constexpr, K_PAD: tl.constexpr):
    """``q[idx] . outlier_residuals`` for the tile's tokens, ``[M_PAD, BLOCK_N]``, from the group's outlier channels
    of the queries ``q_out`` ``[M_PAD, K_PAD]``: ``K`` rank-one updates in fp32 (a product padded to the 16 x 16
    tensor-core minimum would be mostly padding for the few outlier channels)."""
    offs_k = tl.arange(0, K_PAD)
    out = tl.zeros((q_out.shape[0], rows.shape[0]), dtype=tl.float32)
    for k in tl.static_range(K):
        q_k = tl.sum(tl.where(offs_k[None, :] == k, q_out, 0.0), axis=1)
        v_k = tl.load(oresiduals_ptr + rows * K + k, mask=ok, other=0.0).to(tl.float32)
        out += q_k[:, None] * v_k[None, :]
    return out


@triton.jit
def tile_scores(proj_ptr, q_ptr, bh, start, n_tokens, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr,
                oresiduals_ptr, s_ptr, so_ptr, scale, oscale, n_groups, M: tl.constexpr, M_PAD: tl.constexpr,
                D: tl.constexpr, SKETCH: tl.constexpr, OSKETCH: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                EXACT: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Estimated scores of the ``STEP`` tokens from ``start`` (one group with outliers): ``[M_PAD, BLOCK_N]``,
    and the tile's token indices and validity. ``proj_ptr``: the program's ``q @ S^T`` from ``project``."""
    tokens = start + tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_N) < STEP) & (tokens < n_tokens)
    rows = bh * n_tokens + tokens
    q_rows = tl.arange(0, M_PAD)
    if K > 0:
        offs_k = tl.arange(0, K_PAD)
        idx = tl.load(idx_ptr + (bh * n_groups + start // STEP) * K + offs_k, mask=offs_k < K, other=0).to(tl.int32)
        q_out = tl.load(q_ptr + (bh * M + q_rows[:, None]) * D + idx[None, :],
                        mask=(q_rows[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
    scores = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for s_start in range(0, SKETCH, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        proj = tl.load(proj_ptr + q_rows[:, None] * SKETCH + offs_s[None, :],
                       mask=(q_rows[:, None] < M) & (offs_s[None, :] < SKETCH), other=0.0)
        if K > 0 and not EXACT:
            proj -= gathered_projection(q_out, s_ptr, idx, offs_s, SKETCH, D, K, K_PAD)
        scores += sign_dot(proj, signs_ptr, rows, ok, s_start, SKETCH, BLOCK_N, BLOCK_S)
    norms = tl.load(norms_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    scores *= (norms * scale)[None, :]
    if EXACT:
        scores += exact_outlier_scores(q_out, oresiduals_ptr, rows, ok, K, K_PAD)
    elif K > 0:
        oscores = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        for s_start in range(0, OSKETCH, BLOCK_S):
            proj = gathered_projection(q_out, so_ptr, idx, s_start + tl.arange(0, BLOCK_S), OSKETCH, D, K, K_PAD)
            oscores += sign_dot(proj, osigns_ptr, rows, ok, s_start, OSKETCH, BLOCK_N, BLOCK_S)
        onorms = tl.load(onorms_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        scores += oscores * (onorms * oscale)[None, :]
    return scores, tokens, ok


@triton.jit
def query_mean(q, mean_ptr, bh, D: tl.constexpr, D_PAD: tl.constexpr):
    """``q . mean`` per query (centred keys), ``[M_PAD]``."""
    offs_d = tl.arange(0, D_PAD)
    mean = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    return tl.sum(q * mean[None, :], axis=1)


@triton.jit
def scores_kernel(q_ptr, s_ptr, so_ptr, mean_ptr, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr, oresiduals_ptr,
                  proj_ptr, out_ptr, n_tokens, n_groups, tokens_per_program, scale, oscale, M: tl.constexpr,
                  M_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SKETCH: tl.constexpr,
                  OSKETCH: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, EXACT: tl.constexpr,
                  STEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, CENTERED: tl.constexpr):
    """``out[bh, m, t]`` float32 for queries ``q`` ``[BH, M, D]`` and tokens of program ``(bh, split)``;
    ``proj_ptr``: float32 scratch ``[programs, M, SKETCH]``."""
    bh, split = tl.program_id(0), tl.program_id(1)
    proj_ptr += (bh * tl.num_programs(1) + split) * M * SKETCH
    project(q_ptr, s_ptr, proj_ptr, bh, M, M_PAD, D, SKETCH, BLOCK_S)
    bias = tl.zeros((M_PAD,), dtype=tl.float32)
    if CENTERED:
        bias = query_mean(load_queries(q_ptr, bh, M, M_PAD, D, D_PAD), mean_ptr, bh, D, D_PAD)
    q_rows = tl.arange(0, M_PAD)
    first = split * tokens_per_program
    last = tl.minimum(first + tokens_per_program, n_tokens)
    for start in range(first, last, STEP):
        scores, tokens, ok = tile_scores(proj_ptr, q_ptr, bh, start, n_tokens, signs_ptr, norms_ptr, idx_ptr,
                                         osigns_ptr, onorms_ptr, oresiduals_ptr, s_ptr, so_ptr, scale, oscale, n_groups,
                                         M, M_PAD, D, SKETCH, OSKETCH, K, K_PAD, EXACT, STEP, BLOCK_N, BLOCK_S)
        tl.store(out_ptr + (bh * M + q_rows[:, None]) * n_tokens + tokens[None, :], scores + bias[:, None],
                 mask=(q_rows[:, None] < M) & ok[None, :])


def launch_config(queries: int, head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  group_size: int, centered: bool, exact_outliers: bool = False) -> dict:
    """The constexprs (and warps) for these shapes; also what ``kernels-compile`` checks."""
    step = group_size if n_outliers else BLOCK_TOKENS
    sketched = n_outliers and not exact_outliers
    return dict(M=queries, M_PAD=pow2(queries, 16), D=head_dim, D_PAD=pow2(head_dim, 16), SKETCH=sketch_dim,
                OSKETCH=outlier_sketch_dim if sketched else 16, K=n_outliers, K_PAD=pow2(n_outliers, 16),
                EXACT=bool(n_outliers and exact_outliers), STEP=step, BLOCK_N=pow2(step, 16), BLOCK_S=BLOCK_SKETCH,
                # ptxas's own register choice spills (sm_90, Triton 3.9), and so does a cap of 128 on sm_80.
                CENTERED=centered, num_warps=4, num_stages=1, maxnreg=168,
                **COMPILER_OPTIONS)


def split_tokens(n_tokens: int, programs_per_split: int, step: int, device: torch.device,
                 programs_per_sm: int = PROGRAMS_PER_SM, min_tokens: int = MIN_TOKENS_PER_PROGRAM) -> int:
    """Tokens per program: enough programs to fill the GPU (flash-decoding), a multiple of ``step``."""
    splits = max(1, triton.cdiv(programs_per_sm * multiprocessors(device), programs_per_split))
    tokens = max(triton.cdiv(n_tokens, splits), min_tokens)
    return triton.cdiv(tokens, step) * step


def outlier_arguments(keys, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None):
    """(idx, outlier signs, outlier norms, outlier residuals, outlier matrix, outlier scale) as the kernels take them:
    contiguous, with the signs (or sketch matrix) standing in for what the constexprs compile away (never read)."""
    signs, _, idx, osigns, onorms, oresiduals = keys

    def present(t):
        return signs if t is None else t.contiguous()

    if outlier_matrix is None:
        return present(idx), signs, signs, present(oresiduals), matrix, 0.0
    oscale = sketch_scale(outlier_matrix)
    return present(idx), present(osigns), present(onorms), signs, outlier_matrix.contiguous(), oscale


def compressed_scores(query: torch.Tensor, keys, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None,
                      group_size: int, key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``query`` float32 ``[b, h, m, d]`` against ``keys`` = (signs, norms, outlier_idx, outlier_signs,
    outlier_norms, outlier_residuals) laid out as ``qjl.keys.QuantizedKeyBlock`` (exact outliers: outlier residuals and
    no ``outlier_matrix``); ``key_mean`` ``[b, h, 1, d]`` (any float dtype) adds ``q . mean``. Returns float32
    ``[b, h, m, n]``."""
    signs, norms, idx, _, _, oresiduals = keys
    b, h, m, d = query.shape
    n = signs.shape[2]
    k = 0 if idx is None else idx.shape[-1]
    out = query.new_empty(b, h, m, n, dtype=torch.float32)
    if not n:
        return out
    config = launch_config(m, d, matrix.shape[0], outlier_matrix.shape[0] if outlier_matrix is not None else 16, k,
                           group_size, key_mean is not None, oresiduals is not None)
    per_program = split_tokens(n, b * h, config["STEP"], query.device)
    q = query.float().contiguous()
    idx, osigns, onorms, oresiduals, so, oscale = outlier_arguments(keys, matrix, outlier_matrix)
    mean = key_mean.contiguous() if key_mean is not None else q  # as stored: the kernel converts it
    grid = (b * h, triton.cdiv(n, per_program))
    scratch = q.new_empty(grid[0] * grid[1], m, matrix.shape[0])  # each program's query projection
    scores_kernel[grid](q, matrix.contiguous(), so, mean, signs.contiguous(), norms.contiguous(), idx, osigns,
                        onorms, oresiduals, scratch, out, n, idx.shape[2] if k else 0, per_program,
                        sketch_scale(matrix), oscale, **config)
    return out
