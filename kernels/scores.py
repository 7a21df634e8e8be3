"""Compressed attention scores of decode queries against packed QJL keys, grouped-query aware.

Reference: ``qjl.keys.score_keys`` (plus ``q . mean`` for centred keys). One program serves one (batch, KV head) and
a contiguous range of tokens; it projects its ``M`` queries (the query heads of that KV head, never repeated keys)
by the sketch once, then per tile of tokens unpacks the sign bits and takes ``<S q, sign(S k)>`` on tensor cores.
With outliers a tile is one token group: the group's ``K`` outlier channels move from the inlier projection to the
outlier one, ``S (q * mask) = S q - S[:, idx] q[idx]``.
"""

import torch
import triton
import triton.language as tl

from .common import dot3, dot_exact_rhs, pow2, unpack_rows

BLOCK_TOKENS = 32  # tile without outliers; with outliers a tile is one token group
MIN_TOKENS_PER_PROGRAM = 256  # amortises the query projection each program does
PROJECT_CHUNK: tl.constexpr = tl.constexpr(16)  # head-dim slice of the query projection


@triton.jit
def load_queries(q_ptr, bh, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    rows = tl.arange(0, M_PAD)
    offs_d = tl.arange(0, D_PAD)
    return tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                   mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def project(q_ptr, bh, s_ptr, M: tl.constexpr, M_PAD: tl.constexpr, SKETCH: tl.constexpr, S_PAD: tl.constexpr,
            D: tl.constexpr, D_PAD: tl.constexpr):
    """``q @ S^T``: ``[M_PAD, S_PAD]`` float32, over the head dim in chunks so ``S`` never sits whole in shared
    memory."""
    rows = tl.arange(0, M_PAD)
    offs_s = tl.arange(0, S_PAD)
    proj = tl.zeros((M_PAD, S_PAD), dtype=tl.float32)
    for start in range(0, D_PAD, PROJECT_CHUNK):  # a loop, not unrolled: one chunk of S live at a time
        offs_d = start + tl.arange(0, PROJECT_CHUNK)
        q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                    mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        s_t = tl.load(s_ptr + offs_s[None, :] * D + offs_d[:, None],
                      mask=(offs_s[None, :] < SKETCH) & (offs_d[:, None] < D), other=0.0)
        proj += dot3(q, s_t)
    return proj


@triton.jit
def sign_scores(proj, signs_ptr, norms_ptr, rows, ok, scale, SKETCH: tl.constexpr, S_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """``scale * ||k|| * <proj, sign(S k)>`` for the tile's tokens (global token rows ``rows``): ``[M_PAD, BLOCK_N]``."""
    offs_b = tl.arange(0, S_PAD // 8)
    packed = tl.load(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :],
                     mask=ok[:, None] & (offs_b[None, :] < SKETCH // 8), other=0)
    signs = unpack_rows(packed, BLOCK_N, S_PAD // 8) * 2 - 1  # padding columns meet zero projections
    norms = tl.load(norms_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    return dot_exact_rhs(proj, tl.trans(signs)) * (norms * scale)[None, :]


@triton.jit
def tile_scores(q_ptr, q, proj, bh, start, n_tokens, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr, s_ptr,
                so_ptr, scale, oscale, n_groups, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                D_PAD: tl.constexpr, SKETCH: tl.constexpr, S_PAD: tl.constexpr, OSKETCH: tl.constexpr,
                OS_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, STEP: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Estimated scores of the ``STEP`` tokens from ``start`` (one group with outliers): ``[M_PAD, BLOCK_N]``,
    and the tile's token indices and validity."""
    tokens = start + tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_N) < STEP) & (tokens < n_tokens)
    rows = bh * n_tokens + tokens
    if K > 0:
        offs_k = tl.arange(0, K_PAD)
        idx = tl.load(idx_ptr + (bh * n_groups + start // STEP) * K + offs_k, mask=offs_k < K, other=0).to(tl.int32)
        q_rows = tl.arange(0, M_PAD)
        q_out = tl.load(q_ptr + (bh * M + q_rows[:, None]) * D + idx[None, :],
                        mask=(q_rows[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        offs_s = tl.arange(0, S_PAD)
        s_idx = tl.load(s_ptr + offs_s[None, :] * D + idx[:, None],
                        mask=(offs_k[:, None] < K) & (offs_s[None, :] < SKETCH), other=0.0)
        offs_o = tl.arange(0, OS_PAD)
        so_idx = tl.load(so_ptr + offs_o[None, :] * D + idx[:, None],
                         mask=(offs_k[:, None] < K) & (offs_o[None, :] < OSKETCH), other=0.0)
        scores = sign_scores(proj - dot3(q_out, s_idx), signs_ptr, norms_ptr, rows, ok, scale, SKETCH, S_PAD,
                             BLOCK_N)
        scores += sign_scores(dot3(q_out, so_idx), osigns_ptr, onorms_ptr, rows, ok, oscale, OSKETCH, OS_PAD,
                              BLOCK_N)
    else:
        scores = sign_scores(proj, signs_ptr, norms_ptr, rows, ok, scale, SKETCH, S_PAD, BLOCK_N)
    return scores, tokens, ok


@triton.jit
def query_mean(q, mean_ptr, bh, D: tl.constexpr, D_PAD: tl.constexpr):
    """``q . mean`` per query (centred keys), ``[M_PAD]``."""
    offs_d = tl.arange(0, D_PAD)
    mean = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    return tl.sum(q * mean[None, :], axis=1)


@triton.jit
def scores_kernel(q_ptr, s_ptr, so_ptr, mean_ptr, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr, out_ptr,
                  n_tokens, n_groups, tokens_per_program, scale, oscale, M: tl.constexpr, M_PAD: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, SKETCH: tl.constexpr, S_PAD: tl.constexpr,
                  OSKETCH: tl.constexpr, OS_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                  STEP: tl.constexpr, BLOCK_N: tl.constexpr, CENTERED: tl.constexpr):
    """``out[bh, m, t]`` float32 for queries ``q`` ``[BH, M, D]`` and tokens of program ``(bh, split)``."""
    bh, split = tl.program_id(0), tl.program_id(1)
    q = load_queries(q_ptr, bh, M, M_PAD, D, D_PAD)
    proj = project(q_ptr, bh, s_ptr, M, M_PAD, SKETCH, S_PAD, D, D_PAD)
    q_rows = tl.arange(0, M_PAD)
    first = split * tokens_per_program
    last = tl.minimum(first + tokens_per_program, n_tokens)
    for start in range(first, last, STEP):
        scores, tokens, ok = tile_scores(q_ptr, q, proj, bh, start, n_tokens, signs_ptr, norms_ptr, idx_ptr,
                                         osigns_ptr, onorms_ptr, s_ptr, so_ptr, scale, oscale, n_groups, M, M_PAD,
                                         D, D_PAD, SKETCH, S_PAD, OSKETCH, OS_PAD, K, K_PAD, STEP, BLOCK_N)
        if CENTERED:
            scores += query_mean(q, mean_ptr, bh, D, D_PAD)[:, None]
        tl.store(out_ptr + (bh * M + q_rows[:, None]) * n_tokens + tokens[None, :], scores,
                 mask=(q_rows[:, None] < M) & ok[None, :])


def launch_config(queries: int, head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  group_size: int, centered: bool) -> dict:
    """The constexprs (and warps) for these shapes; also what ``kernels-compile`` checks."""
    step = group_size if n_outliers else BLOCK_TOKENS
    s_pad, os_pad = pow2(sketch_dim, 16), pow2(outlier_sketch_dim if n_outliers else 16, 16)
    return dict(M=queries, M_PAD=pow2(queries, 16), D=head_dim, D_PAD=pow2(head_dim, 16), SKETCH=sketch_dim,
                S_PAD=s_pad, OSKETCH=outlier_sketch_dim if n_outliers else 16, OS_PAD=os_pad, K=n_outliers,
                K_PAD=pow2(n_outliers, 16), STEP=step, BLOCK_N=pow2(step, 16), CENTERED=centered,
                num_warps=8 if head_dim >= 128 or s_pad >= 256 else 4)


def split_tokens(n_tokens: int, programs_per_split: int, step: int, device: torch.device) -> int:
    """Tokens per program: enough programs to fill the GPU (flash-decoding), a multiple of ``step``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    splits = max(1, triton.cdiv(2 * sms, programs_per_split))
    tokens = max(triton.cdiv(n_tokens, splits), MIN_TOKENS_PER_PROGRAM)
    return triton.cdiv(tokens, step) * step


def compressed_scores(query: torch.Tensor, keys, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None,
                      group_size: int, key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``query`` float32 ``[b, h, m, d]`` against ``keys`` = (signs, norms, outlier_idx, outlier_signs,
    outlier_norms) laid out as ``qjl.keys.QuantizedKeyBlock``; ``key_mean`` ``[b, h, 1, d]`` adds ``q . mean``.
    Returns float32 ``[b, h, m, n]``."""
    signs, norms, idx, osigns, onorms = keys
    b, h, m, d = query.shape
    n = signs.shape[2]
    k = 0 if idx is None else idx.shape[-1]
    out = query.new_empty(b, h, m, n, dtype=torch.float32)
    if not n:
        return out
    config = launch_config(m, d, matrix.shape[0], outlier_matrix.shape[0] if k else 16, k, group_size,
                           key_mean is not None)
    per_program = split_tokens(n, b * h, config["STEP"], query.device)
    q = query.float().contiguous()
    signs, norms = signs.contiguous(), norms.contiguous()
    if k:
        idx, osigns, onorms, so = idx.contiguous(), osigns.contiguous(), onorms.contiguous(), outlier_matrix
    else:
        idx = osigns = onorms = signs  # K = 0 compiles the outlier branch away
        so = matrix
    mean = key_mean.float().contiguous() if key_mean is not None else q
    oscale = 0.0 if not k else (torch.pi / 2) ** 0.5 / outlier_matrix.shape[0]
    grid = (b * h, triton.cdiv(n, per_program))
    scores_kernel[grid](q, matrix.contiguous(), so.contiguous(), mean, signs, norms, idx, osigns, onorms, out, n,
                        idx.shape[2] if k else 0, per_program, (torch.pi / 2) ** 0.5 / matrix.shape[0], oscale,
                        **config)
    return out
