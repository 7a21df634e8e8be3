"""Fused QJL decode attention, flash-decoding style: each program takes one (batch, KV head) and a range of
compressed tokens, scores them from the packed signs (``kernels.scores``), dequantizes their values in registers and
keeps an online softmax; one extra program per (batch, KV head) does the exact sink and buffer tokens. Partial
maxima, sums and outputs go to ``kernels.combine_splits``. A decode step reads each compressed byte once.

Reference: ``qjl.layer.CompressedLayer.attend`` with ``QJLLayer``'s scores and values, for one query token.
"""

import torch
import triton
import triton.language as tl

from .combine_splits import combine_splits
from .common import dot3, unpack_rows
from .scores import launch_config as scores_config
from .scores import load_queries, outlier_arguments, project, query_mean, split_tokens, tile_scores

BLOCK_EXACT = 32
# Launch choices measured by scripts/sweep_decode.py on an H200 (profiling/results/nvidia-h200/): two pipeline stages
# and four programs per multiprocessor were the fastest at 32k and 128k tokens, batch 8, by about 20%.
NUM_STAGES = 2
PROGRAMS_PER_SM = 4
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax(scores, v, m_i, l_i, acc):
    """Folds a tile (``scores`` in log2 units, -inf where masked) into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + dot3(p, v)


@triton.jit
def _dequantize(packed_ptr, scales_ptr, mins_ptr, rows, ok, D: tl.constexpr, D_PAD: tl.constexpr,
                BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Values of the tile's tokens from bit planes: ``code * scale + minimum``, float32 ``[BLOCK_N, D_PAD]``."""
    offs_b = tl.arange(0, D_PAD // 8)
    offs_d = tl.arange(0, D_PAD)
    codes = tl.zeros((BLOCK_N, D_PAD), dtype=tl.int32)
    for plane in tl.static_range(BITS):
        packed = tl.load(packed_ptr + rows[:, None] * (BITS * D // 8) + plane * (D // 8) + offs_b[None, :],
                         mask=ok[:, None] & (offs_b[None, :] < D // 8), other=0)
        codes += unpack_rows(packed, BLOCK_N, D_PAD // 8) << plane
    group_ok = ok[:, None] & (offs_d[None, :] < D)
    groups = rows[:, None] * (D // VGROUP) + offs_d[None, :] // VGROUP
    scales = tl.load(scales_ptr + groups, mask=group_ok, other=0.0).to(tl.float32)
    minimums = tl.load(mins_ptr + groups, mask=group_ok, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * scales + minimums


@triton.jit
def _exact_tokens(q, k_ptr, v_ptr, bh, n, qk_scale, m_i, l_i, acc, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, D_PAD)
    for start in range(0, n, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        ok = tokens < n
        inside = ok[:, None] & (offs_d[None, :] < D)
        offsets = (bh * n + tokens[:, None]) * D + offs_d[None, :]
        k = tl.load(k_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        scores = tl.where(ok[None, :], dot3(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_i, l_i, acc = _online_softmax(scores, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def decode_split_kernel(q_ptr, s_ptr, so_ptr, mean_ptr, signs_ptr, norms_ptr, idx_ptr, osigns_ptr, onorms_ptr,
                        ovalues_ptr, proj_ptr, vpacked_ptr, vscales_ptr, vmins_ptr, sink_k_ptr, sink_v_ptr, buf_k_ptr,
                        buf_v_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, n_tokens, n_groups, tokens_per_split, n_sink,
                        n_buffer, scale, oscale, qk_scale, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                        D_PAD: tl.constexpr, SKETCH: tl.constexpr, OSKETCH: tl.constexpr, K: tl.constexpr,
                        K_PAD: tl.constexpr, EXACT: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_S: tl.constexpr, CENTERED: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr,
                        BLOCK_EXACT: tl.constexpr):
    """Program ``(bh, split)``: splits ``0 .. S-1`` take compressed tokens, split ``S`` the exact ones. Writes the
    split's max and sum (log2 units) ``[BH, S + 1, M]`` and unnormalised output ``[BH, S + 1, M, D]``;
    ``proj_ptr``: float32 scratch ``[BH * S, M, SKETCH]`` for the compressed splits' query projections."""
    bh, split = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(1)
    m_i = tl.full((M_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((M_PAD,), dtype=tl.float32)
    acc = tl.zeros((M_PAD, D_PAD), dtype=tl.float32)
    if split < n_splits - 1:
        proj_ptr += (bh * (n_splits - 1) + split) * M * SKETCH
        project(q_ptr, s_ptr, proj_ptr, bh, M, M_PAD, D, SKETCH, BLOCK_S)
        bias = tl.zeros((M_PAD,), dtype=tl.float32)
        if CENTERED:
            bias = query_mean(load_queries(q_ptr, bh, M, M_PAD, D, D_PAD), mean_ptr, bh, D, D_PAD) * qk_scale
        first = split * tokens_per_split
        last = tl.minimum(first + tokens_per_split, n_tokens)
        for start in range(first, last, STEP):
            scores, tokens, ok = tile_scores(proj_ptr, q_ptr, bh, start, n_tokens, signs_ptr, norms_ptr, idx_ptr,
                                             osigns_ptr, onorms_ptr, ovalues_ptr, s_ptr, so_ptr, scale, oscale,
                                             n_groups, M, M_PAD, D, SKETCH, OSKETCH, K, K_PAD, EXACT, STEP, BLOCK_N,
                                             BLOCK_S)
            scores = tl.where(ok[None, :], scores * qk_scale + bias[:, None], float("-inf"))
            v = _dequantize(vpacked_ptr, vscales_ptr, vmins_ptr, bh * n_tokens + tokens, ok, D, D_PAD, BITS, VGROUP,
                            BLOCK_N)
            m_i, l_i, acc = _online_softmax(scores, v, m_i, l_i, acc)
    else:
        q = load_queries(q_ptr, bh, M, M_PAD, D, D_PAD)
        m_i, l_i, acc = _exact_tokens(q, sink_k_ptr, sink_v_ptr, bh, n_sink, qk_scale, m_i, l_i, acc, D, D_PAD,
                                      BLOCK_EXACT)
        m_i, l_i, acc = _exact_tokens(q, buf_k_ptr, buf_v_ptr, bh, n_buffer, qk_scale, m_i, l_i, acc, D, D_PAD,
                                      BLOCK_EXACT)
    rows = tl.arange(0, M_PAD)
    offs_d = tl.arange(0, D_PAD)
    part = bh * n_splits + split
    tl.store(part_m_ptr + part * M + rows, m_i, mask=rows < M)
    tl.store(part_l_ptr + part * M + rows, l_i, mask=rows < M)
    tl.store(part_acc_ptr + (part * M + rows[:, None]) * D + offs_d[None, :], acc,
             mask=(rows[:, None] < M) & (offs_d[None, :] < D))


def launch_config(queries: int, head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  group_size: int, centered: bool, value_bits: int, value_group_size: int,
                  exact_outliers: bool = False) -> dict:
    """The constexprs (and warps) for these shapes; also what ``kernels-compile`` checks."""
    config = scores_config(queries, head_dim, sketch_dim, outlier_sketch_dim, n_outliers, group_size, centered,
                           exact_outliers)
    # The value tile and output row grow with the head dim: 8 warps from 256 on (4 spill there). maxnreg stops
    # ptxas capping registers at 128 for a second resident program, which spills on sm_80.
    return dict(config, BITS=value_bits, VGROUP=value_group_size, BLOCK_EXACT=BLOCK_EXACT,
                num_warps=8 if head_dim >= 256 else 4, num_stages=NUM_STAGES, maxnreg=255)


def decode_attention(query: torch.Tensor, keys, values, value_bits: int, matrix: torch.Tensor,
                     outlier_matrix: torch.Tensor | None, group_size: int, key_mean: torch.Tensor | None,
                     exact_keys, exact_values, scaling: float, tuning: dict | None = None) -> torch.Tensor:
    """Attention of one decode token. ``query`` ``[b, hq, 1, d]``; ``keys`` = (signs, norms, outlier_idx,
    outlier_signs, outlier_norms, outlier_values) (exact outliers: no ``outlier_matrix``) and ``values`` = (packed,
    scales, minimums) as ``QJLLayer`` stores them (``[b, h, n, ...]``); ``exact_keys``/``exact_values`` = (sink,
    buffer) ``[b, h, *, d]``. Returns ``[b, 1, hq, d]`` in the query's dtype. ``tuning`` overrides launch choices
    (``num_warps``, ``num_stages``, ``programs_per_sm``, ``min_tokens``) for ``scripts/sweep_decode.py``."""
    signs, norms, idx, _, _, ovalues = keys
    b, hq, _, d = query.shape
    h, n = signs.shape[1], signs.shape[2]
    group = hq // h
    k = 0 if idx is None else idx.shape[-1]
    config = launch_config(group, d, matrix.shape[0], outlier_matrix.shape[0] if outlier_matrix is not None else 16,
                           k, group_size, key_mean is not None, value_bits, d // values[1].shape[-1],
                           ovalues is not None)
    tuning = {"programs_per_sm": PROGRAMS_PER_SM, **(tuning or {})}
    config.update({name: tuning.pop(name) for name in ("num_warps", "num_stages") if name in tuning})
    splits = triton.cdiv(n, split_tokens(n, b * h, config["STEP"], query.device, **tuning)) if n else 0
    per_split = triton.cdiv(n, splits) if splits else 0
    per_split = triton.cdiv(per_split, config["STEP"]) * config["STEP"]
    q = query.reshape(b * h, group, d).contiguous()
    sink_k, buf_k = (t.contiguous() for t in exact_keys)
    sink_v, buf_v = (t.contiguous() for t in exact_values)
    packed, scales, minimums = (t.contiguous() for t in values)
    idx, osigns, onorms, ovalues, so, oscale = outlier_arguments(keys, matrix, outlier_matrix)
    mean = key_mean.float().contiguous() if key_mean is not None else q
    part_m = q.new_empty(b * h, splits + 1, group, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = q.new_empty(b * h, splits + 1, group, d, dtype=torch.float32)
    scratch = q.new_empty(b * h * splits, group, matrix.shape[0], dtype=torch.float32)  # query projections
    decode_split_kernel[(b * h, splits + 1)](
        q, matrix.contiguous(), so, mean, signs.contiguous(), norms.contiguous(), idx, osigns, onorms, ovalues,
        scratch, packed, scales, minimums, sink_k, sink_v, buf_k, buf_v, part_m, part_l, part_acc, n,
        idx.shape[2] if k else 0, max(per_split, 1), sink_k.shape[2], buf_k.shape[2],
        (torch.pi / 2) ** 0.5 / matrix.shape[0], oscale, scaling * LOG2E, **config)
    out = combine_splits(part_m, part_l, part_acc, query.dtype)  # [b h, group, d]
    return out.reshape(b, 1, hq, d)
