"""Fused QJL decode attention, flash-decoding style: each program takes one (batch, KV head) and a range of
compressed tokens, scores them from the packed signs, takes their values from the packed codes, and keeps an online
softmax; one extra program per (batch, KV head) does the exact sink and buffer tokens. Partial maxima, sums and
outputs go to ``kernels.combine_splits``. A decode step reads each compressed byte once.

Everything per token is a tensor-core product on operands unpacked straight from the bits, so a tile costs few
instructions per stored bit (the kernel must keep up with HBM):

- scores: ``<S q, sign(S k)>`` with the program's projection ``S q`` split once into fp16 high and low parts;
- outlier channels (one set per token group, so a tile is one group): the inlier sketch saw ``k`` without them,
  ``S (q * mask) . sign = S q . sign - sum_k q[i_k] u_k`` with ``u_k = S[:, i_k] . sign`` from ``S^T``'s rows;
  exact outliers add ``q[i_k] v_k``, sketched ones ``q[i_k] (S_o[:, i_k] . sign_o)``: one small product per tile;
- values: ``code * scale + minimum``; with one group per token row ``p @ v = (p * scale) @ codes + p . minimum``
  with the integer codes exact in fp16, else the dequantized tile in fp32.

Reference: ``qjl.layer.CompressedLayer.attend`` with ``QJLLayer``'s scores and values, for one query token.
"""

import torch
import triton
import triton.language as tl

from .combine_splits import combine_splits
from .common import dot3, dot_exact_rhs, pow2, signs_fp16, split_fp16, unpack_rows
from .scores import BLOCK_TOKENS, load_queries, query_mean, split_tokens

BLOCK_EXACT = 32
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax(scores, v, m_i, l_i, acc):
    """Folds a tile (``scores`` in log2 units, -inf where masked) into the running max, sum and output."""
    m_new, m_safe, alpha, p = _softmax_step(scores, m_i)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + dot3(p, v)


@triton.jit
def _softmax_step(scores, m_i):
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    return m_new, m_safe, tl.exp2(m_i - m_safe), tl.exp2(scores - m_safe[:, None])


@triton.jit
def _project(q_ptr, st_hi_ptr, st_lo_ptr, bh, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
             SKETCH: tl.constexpr, SKETCH_PAD: tl.constexpr):
    """``q @ S^T`` float32 ``[M_PAD, SKETCH_PAD]`` (zero padding) from ``S^T``'s fp16 high and low parts."""
    rows = tl.arange(0, M_PAD)
    offs_s = tl.arange(0, SKETCH_PAD)
    proj = tl.zeros((M_PAD, SKETCH_PAD), dtype=tl.float32)
    for d_start in tl.static_range(0, D, 16):
        offs_d = d_start + tl.arange(0, 16)
        q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + offs_d[None, :],
                    mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        table = offs_d[:, None] * SKETCH + offs_s[None, :]
        inside = (offs_d[:, None] < D) & (offs_s[None, :] < SKETCH)
        s_hi = tl.load(st_hi_ptr + table, mask=inside, other=0.0)
        s_lo = tl.load(st_lo_ptr + table, mask=inside, other=0.0)
        q_hi, q_lo = split_fp16(q)
        proj += tl.dot(q_hi, s_hi) + tl.dot(q_lo, s_hi) + tl.dot(q_hi, s_lo)
    return proj


@triton.jit
def _sign_products(table_hi_ptr, table_lo_ptr, idx, signs_t, SKETCH: tl.constexpr, SKETCH_PAD: tl.constexpr,
                   K: tl.constexpr, K_PAD: tl.constexpr):
    """``u[k, t] = S[:, idx_k] . sign_t``, ``[K_PAD, BLOCK_N]``, from the rows ``idx`` of ``S^T`` (high and low)."""
    offs_k = tl.arange(0, K_PAD)
    offs_s = tl.arange(0, SKETCH_PAD)
    rows = idx[:, None] * SKETCH + offs_s[None, :]
    inside = (offs_k[:, None] < K) & (offs_s[None, :] < SKETCH)
    s_hi = tl.load(table_hi_ptr + rows, mask=inside, other=0.0)
    s_lo = tl.load(table_lo_ptr + rows, mask=inside, other=0.0)
    return tl.dot(s_hi, signs_t) + tl.dot(s_lo, signs_t)


@triton.jit
def _load_signs_t(signs_ptr, rows, ok, SKETCH: tl.constexpr, SKETCH_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's signs as fp16 +-1, transposed: ``[SKETCH_PAD, BLOCK_N]`` (padding rows meet zero operands)."""
    offs_b = tl.arange(0, SKETCH_PAD // 8)
    packed = tl.load(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :],
                     mask=ok[:, None] & (offs_b[None, :] < SKETCH // 8), other=0)
    return tl.trans(signs_fp16(packed, BLOCK_N, SKETCH_PAD // 8))


@triton.jit
def _tile_scores(proj_hi, proj_lo, q_ptr, bh, start, n_tokens, n_groups, signs_ptr, norms_ptr, idx_ptr, osigns_ptr,
                 onorms_ptr, ovalues_ptr, st_hi_ptr, st_lo_ptr, sto_hi_ptr, sto_lo_ptr, scale, oscale,
                 M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, SKETCH: tl.constexpr,
                 SKETCH_PAD: tl.constexpr, OSKETCH: tl.constexpr, OSKETCH_PAD: tl.constexpr, K: tl.constexpr,
                 K_PAD: tl.constexpr, EXACT: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Estimated scores of the ``STEP`` tokens from ``start``: ``[M_PAD, BLOCK_N]``, the tokens and their validity."""
    tokens = start + tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_N) < STEP) & (tokens < n_tokens)
    rows = bh * n_tokens + tokens
    signs_t = _load_signs_t(signs_ptr, rows, ok, SKETCH, SKETCH_PAD, BLOCK_N)
    weight = tl.load(norms_ptr + rows, mask=ok, other=0.0).to(tl.float32) * scale
    scores = (tl.dot(proj_hi, signs_t) + tl.dot(proj_lo, signs_t)) * weight[None, :]
    if K > 0:
        offs_k = tl.arange(0, K_PAD)
        idx = tl.load(idx_ptr + (bh * n_groups + start // STEP) * K + offs_k, mask=offs_k < K, other=0).to(tl.int32)
        q_rows = tl.arange(0, M_PAD)
        q_out = tl.load(q_ptr + (bh * M + q_rows[:, None]) * D + idx[None, :],
                        mask=(q_rows[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        outlier = -_sign_products(st_hi_ptr, st_lo_ptr, idx, signs_t, SKETCH, SKETCH_PAD, K, K_PAD) * weight[None, :]
        if EXACT:
            outlier += tl.load(ovalues_ptr + rows[None, :] * K + offs_k[:, None],
                               mask=(offs_k[:, None] < K) & ok[None, :], other=0.0).to(tl.float32)
        else:
            osigns_t = _load_signs_t(osigns_ptr, rows, ok, OSKETCH, OSKETCH_PAD, BLOCK_N)
            oweight = tl.load(onorms_ptr + rows, mask=ok, other=0.0).to(tl.float32) * oscale
            outlier += _sign_products(sto_hi_ptr, sto_lo_ptr, idx, osigns_t, OSKETCH, OSKETCH_PAD, K,
                                      K_PAD) * oweight[None, :]
        scores += dot3(q_out, outlier)
    return scores, tokens, ok


@triton.jit
def _value_codes(packed_ptr, rows, ok, D: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Integer codes of the tile's values from their bit planes, int32 ``[BLOCK_N, D_PAD]``."""
    offs_b = tl.arange(0, D_PAD // 8)
    codes = tl.zeros((BLOCK_N, D_PAD), dtype=tl.int32)
    for plane in tl.static_range(BITS):
        packed = tl.load(packed_ptr + rows[:, None] * (BITS * D // 8) + plane * (D // 8) + offs_b[None, :],
                         mask=ok[:, None] & (offs_b[None, :] < D // 8), other=0)
        codes += unpack_rows(packed, BLOCK_N, D_PAD // 8) << plane
    return codes


@triton.jit
def _compressed_values(p, packed_ptr, scales_ptr, mins_ptr, rows, ok, D: tl.constexpr, D_PAD: tl.constexpr,
                       BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``p @ values`` of the tile, float32 ``[M_PAD, D_PAD]``."""
    codes = _value_codes(packed_ptr, rows, ok, D, D_PAD, BITS, BLOCK_N)
    if VGROUP == D:  # one scale per token: the codes are the exact fp16 operand
        scales = tl.load(scales_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        minimums = tl.load(mins_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        out = dot_exact_rhs(p * scales[None, :], codes) + tl.sum(p * minimums[None, :], axis=1)[:, None]
    else:
        offs_d = tl.arange(0, D_PAD)
        group_ok = ok[:, None] & (offs_d[None, :] < D)
        groups = rows[:, None] * (D // VGROUP) + offs_d[None, :] // VGROUP
        scales = tl.load(scales_ptr + groups, mask=group_ok, other=0.0).to(tl.float32)
        minimums = tl.load(mins_ptr + groups, mask=group_ok, other=0.0).to(tl.float32)
        out = dot3(p, codes.to(tl.float32) * scales + minimums)
    return out


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
def decode_split_kernel(q_ptr, st_hi_ptr, st_lo_ptr, sto_hi_ptr, sto_lo_ptr, mean_ptr, signs_ptr, norms_ptr, idx_ptr,
                        osigns_ptr, onorms_ptr, ovalues_ptr, vpacked_ptr, vscales_ptr, vmins_ptr, sink_k_ptr,
                        sink_v_ptr, buf_k_ptr, buf_v_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, n_tokens, n_groups,
                        tokens_per_split, n_sink, n_buffer, scale, oscale, qk_scale, M: tl.constexpr,
                        M_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SKETCH: tl.constexpr,
                        SKETCH_PAD: tl.constexpr, OSKETCH: tl.constexpr, OSKETCH_PAD: tl.constexpr, K: tl.constexpr,
                        K_PAD: tl.constexpr, EXACT: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr,
                        CENTERED: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr,
                        BLOCK_EXACT: tl.constexpr):
    """Program ``(bh, split)``: splits ``0 .. S-1`` take compressed tokens, split ``S`` the exact ones. Writes the
    split's max and sum (log2 units) ``[BH, S + 1, M]`` and unnormalised output ``[BH, S + 1, M, D]``. ``st_*``:
    ``S^T`` ``[D, SKETCH]`` as fp16 high and low parts (``sto_*`` the outlier sketch's)."""
    bh, split = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(1)
    m_i = tl.full((M_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((M_PAD,), dtype=tl.float32)
    acc = tl.zeros((M_PAD, D_PAD), dtype=tl.float32)
    if split < n_splits - 1:
        proj_hi, proj_lo = split_fp16(_project(q_ptr, st_hi_ptr, st_lo_ptr, bh, M, M_PAD, D, SKETCH, SKETCH_PAD))
        bias = tl.zeros((M_PAD,), dtype=tl.float32)
        if CENTERED:
            bias = query_mean(load_queries(q_ptr, bh, M, M_PAD, D, D_PAD), mean_ptr, bh, D, D_PAD) * qk_scale
        first = split * tokens_per_split
        last = tl.minimum(first + tokens_per_split, n_tokens)
        for start in range(first, last, STEP):
            scores, tokens, ok = _tile_scores(proj_hi, proj_lo, q_ptr, bh, start, n_tokens, n_groups, signs_ptr,
                                              norms_ptr, idx_ptr, osigns_ptr, onorms_ptr, ovalues_ptr, st_hi_ptr,
                                              st_lo_ptr, sto_hi_ptr, sto_lo_ptr, scale, oscale, M, M_PAD, D, SKETCH,
                                              SKETCH_PAD, OSKETCH, OSKETCH_PAD, K, K_PAD, EXACT, STEP, BLOCK_N)
            scores = tl.where(ok[None, :], scores * qk_scale + bias[:, None], float("-inf"))
            m_i, m_safe, alpha, p = _softmax_step(scores, m_i)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _compressed_values(p, vpacked_ptr, vscales_ptr, vmins_ptr,
                                                            bh * n_tokens + tokens, ok, D, D_PAD, BITS, VGROUP,
                                                            BLOCK_N)
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
    step = group_size if n_outliers else BLOCK_TOKENS
    sketched = n_outliers and not exact_outliers
    return dict(M=queries, M_PAD=pow2(queries, 16), D=head_dim, D_PAD=pow2(head_dim, 16), SKETCH=sketch_dim,
                SKETCH_PAD=pow2(sketch_dim, 16), OSKETCH=outlier_sketch_dim if sketched else 16,
                OSKETCH_PAD=pow2(outlier_sketch_dim, 16) if sketched else 16, K=n_outliers,
                K_PAD=pow2(n_outliers, 16), EXACT=bool(n_outliers and exact_outliers), STEP=step,
                BLOCK_N=pow2(step, 16), CENTERED=centered, BITS=value_bits, VGROUP=value_group_size,
                BLOCK_EXACT=BLOCK_EXACT, num_warps=4, num_stages=1)


def transposed_halves(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix^T`` as fp16 high and low parts (``hi + lo`` is the fp32 matrix to ~2^-22), kept on the matrix."""
    cached = getattr(matrix, "_transposed_halves", None)
    if cached is None or cached[0] != matrix._version:
        t = matrix.t().float().contiguous()
        hi = t.half()
        cached = (matrix._version, hi, (t - hi.float()).half())
        matrix._transposed_halves = cached
    return cached[1], cached[2]


def decode_attention(query: torch.Tensor, keys, values, value_bits: int, matrix: torch.Tensor,
                     outlier_matrix: torch.Tensor | None, group_size: int, key_mean: torch.Tensor | None,
                     exact_keys, exact_values, scaling: float, tuning: dict | None = None) -> torch.Tensor:
    """Attention of one decode token. ``query`` ``[b, hq, 1, d]``; ``keys`` = (signs, norms, outlier_idx,
    outlier_signs, outlier_norms, outlier_values) (exact outliers: no ``outlier_matrix``) and ``values`` = (packed,
    scales, minimums) as ``QJLLayer`` stores them (``[b, h, n, ...]``); ``exact_keys``/``exact_values`` = (sink,
    buffer) ``[b, h, *, d]``. Returns ``[b, 1, hq, d]`` in the query's dtype. ``tuning`` overrides launch choices
    (``num_warps``, ``num_stages``, ``programs_per_sm``, ``min_tokens``) for benchmarks."""
    signs, norms, idx, osigns, onorms, ovalues = keys
    b, hq, _, d = query.shape
    h, n = signs.shape[1], signs.shape[2]
    group = hq // h
    k = 0 if idx is None else idx.shape[-1]
    tuning = dict(tuning or {})
    config = launch_config(group, d, matrix.shape[0], outlier_matrix.shape[0] if outlier_matrix is not None else 16,
                           k, group_size, key_mean is not None, value_bits, d // values[1].shape[-1],
                           ovalues is not None)
    config.update({name: tuning.pop(name) for name in ("num_warps", "num_stages") if name in tuning})
    splits = triton.cdiv(n, split_tokens(n, b * h, config["STEP"], query.device, **tuning)) if n else 0
    per_split = triton.cdiv(n, splits) if splits else 0
    per_split = triton.cdiv(per_split, config["STEP"]) * config["STEP"]
    q = query.reshape(b * h, group, d).contiguous()
    st_hi, st_lo = transposed_halves(matrix)
    sto_hi, sto_lo = transposed_halves(outlier_matrix) if outlier_matrix is not None else (st_hi, st_lo)
    sink_k, buf_k = (t.contiguous() for t in exact_keys)
    sink_v, buf_v = (t.contiguous() for t in exact_values)
    packed, scales, minimums = (t.contiguous() for t in values)

    def present(t):  # what a constexpr compiles away still needs a pointer
        return signs if t is None else t.contiguous()

    mean = key_mean.float().contiguous() if key_mean is not None else q
    part_m = q.new_empty(b * h, splits + 1, group, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = q.new_empty(b * h, splits + 1, group, d, dtype=torch.float32)
    oscale = (torch.pi / 2) ** 0.5 / outlier_matrix.shape[0] if outlier_matrix is not None else 0.0
    decode_split_kernel[(b * h, splits + 1)](
        q, st_hi, st_lo, sto_hi, sto_lo, mean, signs.contiguous(), norms.contiguous(), present(idx), present(osigns),
        present(onorms), present(ovalues), packed, scales, minimums, sink_k, sink_v, buf_k, buf_v, part_m, part_l,
        part_acc, n, idx.shape[2] if k else 0, max(per_split, 1), sink_k.shape[2], buf_k.shape[2],
        (torch.pi / 2) ** 0.5 / matrix.shape[0], oscale, scaling * LOG2E, **config)
    out = combine_splits(part_m, part_l, part_acc, query.dtype)  # [b h, group, d]
    return out.reshape(b, 1, hq, d)
