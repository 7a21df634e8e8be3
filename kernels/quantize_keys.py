"""Key quantization in one pass: split the outlier channels, project by the sketch(es), take signs, pack 8 a byte,
write the norms; with exact outliers (no outlier sketch) the outlier channels are written instead as fp16 residuals,
``k[c] - w (S^T sign(S k_in))[c]`` (``qjl.keys``' docstring), from the signs just written, read back: one small
product a sketch slice with the group's columns of ``S`` where the block's tokens share their outlier channels, else
(a block that straddles groups, after a crop or with groups of fewer than 32 tokens) the whole ``S^T sign``.
Reference: ``qjl.keys.quantize_keys``. Keys are read in the model's dtype, in place in the cache's buffer (any stride
between heads), and centred as they load (``k.to(fp32) - mean``, the reference's arithmetic), so no centred fp32
copy of them is ever written.

Each projection runs in ``[tokens, BLOCK_SKETCH]`` output tiles over 32-channel slices of the head dim, so the
live tiles (and the registers and shared memory they take) do not grow with the head dim or the sketch size; the
key slices are reloaded per output tile from L1/L2 rather than held.
"""

import torch
import triton
import triton.language as tl

from .common import COMPILER_OPTIONS, dot3, dot_exact_lhs, head_rows, pack_rows, pow2, sketch_scale, unpack_rows

BLOCK_TOKENS = 32
BLOCK_SKETCH = 64
# Sketch rows a step of the residuals (exact outliers) take: with 64, as the projection, the kernel took 176 to 215
# registers in place of 148 (Triton 3.6, sm_90), two programs a multiprocessor in place of three; with 32, 163-168
# (Triton 3.6 and 3.9), three.
BLOCK_RESIDUALS = tl.constexpr(32)


@triton.jit
def _outlier_words(idx_ptr, rows, ok, K: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tokens' outlier channels as bitmasks, int32 ``[BLOCK_N, WORDS]``: channel ``c`` is bit ``c % 32`` of
    word ``c // 32``. Built once, so the ``K`` index loads are not repeated (nor hoisted into ``K`` live tensors)
    in the slice loops."""
    offs_w = tl.arange(0, WORDS)
    words = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
    for k in tl.static_range(K):
        channel = tl.load(idx_ptr + rows * K + k, mask=ok, other=0).to(tl.int32)
        words = words | tl.where(offs_w[None, :] == channel[:, None] // 32, 1 << (channel[:, None] % 32), 0)
    return words


@triton.jit
def _key_slice(keys_ptr, mean_ptr, words, tokens, ok, start, D: tl.constexpr, K: tl.constexpr,
               OUTLIERS: tl.constexpr, WORDS: tl.constexpr):
    """Channels ``start .. start + 31`` of the tokens' centred keys, float32 ``[BLOCK_N, 32]``: the outlier channels
    only (``OUTLIERS``) or all but them. ``keys_ptr`` and ``mean_ptr`` point at the program's head."""
    offs_d = start + tl.arange(0, 32)
    x = tl.load(keys_ptr + tokens[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)
    x = x - tl.load(mean_ptr + offs_d, mask=offs_d < D, other=0.0)[None, :]
    if K > 0:
        word = tl.sum(tl.where(tl.arange(0, WORDS)[None, :] == start // 32, words, 0), axis=1)
        outlier = ((word[:, None] >> tl.arange(0, 32)[None, :]) & 1) != 0
        if OUTLIERS:
            x = tl.where(outlier, x, 0.0)
        else:
            x = tl.where(outlier, 0.0, x)
    return x


@triton.jit
def _norm(keys_ptr, mean_ptr, words, tokens, ok, D: tl.constexpr, K: tl.constexpr, OUTLIERS: tl.constexpr,
          WORDS: tl.constexpr, BLOCK_N: tl.constexpr):
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, D, 32):
        x = _key_slice(keys_ptr, mean_ptr, words, tokens, ok, start, D, K, OUTLIERS, WORDS)
        total += tl.sum(x * x, axis=1)
    return tl.sqrt(total)


@triton.jit
def _project_pack(keys_ptr, mean_ptr, words, s_ptr, signs_ptr, tokens, rows, ok, SKETCH: tl.constexpr,
                  D: tl.constexpr, K: tl.constexpr, OUTLIERS: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    for start in range(0, SKETCH, BLOCK_M):  # loops, not unrolled: one output tile and one slice live at a time
        offs_m = start + tl.arange(0, BLOCK_M)
        proj = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d_start in range(0, D, 32):
            offs_d = d_start + tl.arange(0, 32)
            x = _key_slice(keys_ptr, mean_ptr, words, tokens, ok, d_start, D, K, OUTLIERS, WORDS)
            s_t = tl.load(s_ptr + offs_m[None, :] * D + offs_d[:, None],
                          mask=(offs_m[None, :] < SKETCH) & (offs_d[:, None] < D), other=0.0)  # S^T slice
            proj += dot3(x, s_t)
        offs_b = start // 8 + tl.arange(0, BLOCK_M // 8)
        tl.store(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :],
                 pack_rows((proj >= 0).to(tl.int32), BLOCK_N, BLOCK_M // 8),
                 mask=ok[:, None] & (offs_b[None, :] < SKETCH // 8))


@triton.jit
def _stored_signs(signs_ptr, rows, ok, start, SKETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tokens' signs of sketch rows ``start .. start + BLOCK_M`` as stored, float32 +-1 ``[BLOCK_N, BLOCK_M]``
    (-1 past the sketch, where the callers' rows of ``S`` are 0)."""
    offs_b = start // 8 + tl.arange(0, BLOCK_M // 8)
    packed = tl.load(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :],
                     mask=ok[:, None] & (offs_b[None, :] < SKETCH // 8), other=0)
    return (unpack_rows(packed, BLOCK_N, BLOCK_M // 8) * 2 - 1).to(tl.float32)


@triton.jit
def _estimates_shared(s_ptr, signs_ptr, shared_channels, rows, ok, D: tl.constexpr, SKETCH: tl.constexpr,
                      K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(S^T sign)[shared_channels]`` float32 ``[BLOCK_N, K_PAD]`` for tokens that share their outlier channels
    (``[K_PAD]``): one small product a sketch slice, with those columns of ``S``."""
    estimates = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    for start in range(0, SKETCH, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        s_columns = tl.load(s_ptr + offs_m[:, None] * D + shared_channels[None, :],
                            mask=(offs_m[:, None] < SKETCH) & (tl.arange(0, K_PAD)[None, :] < K), other=0.0)
        estimates += dot_exact_lhs(_stored_signs(signs_ptr, rows, ok, start, SKETCH, BLOCK_N, BLOCK_M), s_columns)
    return estimates


@triton.jit
def _estimates_per_token(s_ptr, signs_ptr, channels, rows, ok, D: tl.constexpr, SKETCH: tl.constexpr,
                         K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(S^T sign)[channels]`` float32 ``[BLOCK_N, K_PAD]`` for any channels per token, from the signs as stored:
    ``S^T sign`` a 32-channel slice of the head dim at a time, each token's channels picked from it."""
    estimates = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
    for d_start in range(0, D, 32):
        offs_d = d_start + tl.arange(0, 32)
        sums = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
        for start in range(0, SKETCH, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            s = tl.load(s_ptr + offs_m[:, None] * D + offs_d[None, :],
                        mask=(offs_m[:, None] < SKETCH) & (offs_d[None, :] < D), other=0.0)
            sums += dot_exact_lhs(_stored_signs(signs_ptr, rows, ok, start, SKETCH, BLOCK_N, BLOCK_M), s)
        local = channels - d_start
        in_slice = (local >= 0) & (local < 32)
        estimates += tl.where(in_slice, tl.gather(sums, tl.where(in_slice, local, 0), axis=1), 0.0)
    return estimates


@triton.jit
def _store_outlier_residuals(keys_ptr, mean_ptr, idx_ptr, s_ptr, signs_ptr, oresiduals_ptr, weights, tokens, rows, ok,
                             first_row, D: tl.constexpr, SKETCH: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``k[c] - weights * (S^T sign)[c]`` as fp16 at ``oresiduals[row, k]`` for the centred keys' channels ``c =
    idx[row, k]`` (``qjl.keys.outlier_residuals``), from the signs as stored. ``S^T sign`` at the channels of the
    block's first token (row ``first_row``) where every token has them (one group), else a whole slice of the head
    dim at a time for each token."""
    offs_k = tl.arange(0, K_PAD)
    inside = ok[:, None] & (offs_k[None, :] < K)
    channels = tl.load(idx_ptr + rows[:, None] * K + offs_k[None, :], mask=inside, other=0).to(tl.int32)
    shared_channels = tl.load(idx_ptr + first_row * K + offs_k, mask=offs_k < K, other=0).to(tl.int32)
    if tl.max(tl.where(inside & (channels != shared_channels[None, :]), 1, 0)) == 0:
        estimates = _estimates_shared(s_ptr, signs_ptr, shared_channels, rows, ok, D, SKETCH, K, K_PAD, BLOCK_N,
                                      BLOCK_M)
    else:
        estimates = _estimates_per_token(s_ptr, signs_ptr, channels, rows, ok, D, SKETCH, K_PAD, BLOCK_N, BLOCK_M)
    x = tl.load(keys_ptr + tokens[:, None] * D + channels, mask=inside, other=0.0).to(tl.float32)
    x = x - tl.load(mean_ptr + channels, mask=inside, other=0.0)
    tl.store(oresiduals_ptr + rows[:, None] * K + offs_k[None, :], (x - estimates * weights[:, None]).to(tl.float16),
             mask=inside)


@triton.jit
def quantize_keys_kernel(keys_ptr, mean_ptr, idx_ptr, s_ptr, so_ptr, signs_ptr, norms_ptr, osigns_ptr, onorms_ptr,
                         oresiduals_ptr, n_tokens, keys_head_stride, scale, D: tl.constexpr, SKETCH: tl.constexpr,
                         OSKETCH: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, EXACT: tl.constexpr,
                         WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One block of tokens of one (batch, head): keys ``[BH, n, D]`` (heads ``keys_head_stride`` apart), mean
    ``[BH, D]``, idx ``[BH, n, K]`` (K = 0: no outliers); ``EXACT``: outlier residuals ``[BH, n, K]`` instead of
    outlier signs and norms; ``scale``: the sketch's (``common.sketch_scale``)."""
    bh, block = tl.program_id(0), tl.program_id(1)
    tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tokens < n_tokens
    rows = bh * n_tokens + tokens
    keys_ptr += bh.to(tl.int64) * keys_head_stride  # past 2^31 numbers at batch 16, 8 heads, 128k tokens
    mean_ptr += bh * D
    words = _outlier_words(idx_ptr, rows, ok, K, WORDS, BLOCK_N)
    if K > 0 and not EXACT:
        onorms = _norm(keys_ptr, mean_ptr, words, tokens, ok, D, K, True, WORDS, BLOCK_N)
        tl.store(onorms_ptr + rows, onorms.to(tl.float16), mask=ok)
        _project_pack(keys_ptr, mean_ptr, words, so_ptr, osigns_ptr, tokens, rows, ok, OSKETCH, D, K, True, WORDS,
                      BLOCK_N, BLOCK_M)
    norms = _norm(keys_ptr, mean_ptr, words, tokens, ok, D, K, False, WORDS, BLOCK_N)
    tl.store(norms_ptr + rows, norms.to(tl.float16), mask=ok)
    _project_pack(keys_ptr, mean_ptr, words, s_ptr, signs_ptr, tokens, rows, ok, SKETCH, D, K, False, WORDS, BLOCK_N,
                  BLOCK_M)
    if EXACT:
        tl.debug_barrier()  # the signs are read back by other threads of this program
        _store_outlier_residuals(keys_ptr, mean_ptr, idx_ptr, s_ptr, signs_ptr, oresiduals_ptr,
                                 norms.to(tl.float16).to(tl.float32) * scale, tokens, rows, ok,
                                 bh * n_tokens + block * BLOCK_N, D, SKETCH, K, K_PAD, BLOCK_N, BLOCK_RESIDUALS)


def launch_config(head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  exact_outliers: bool = False) -> dict:
    """The constexprs the launcher compiles for these shapes (also what ``kernels-compile`` checks)."""
    sketched = n_outliers and not exact_outliers
    # K_PAD: at least 16, the columns of the residuals' product (_estimates_shared)
    return dict(D=head_dim, SKETCH=sketch_dim, OSKETCH=outlier_sketch_dim if sketched else 8, K=n_outliers,
                K_PAD=pow2(n_outliers, 16), EXACT=bool(n_outliers and exact_outliers), BLOCK_N=BLOCK_TOKENS,
                BLOCK_M=BLOCK_SKETCH, WORDS=pow2(triton.cdiv(head_dim, 32)), num_warps=4, num_stages=1,
                maxnreg=255, **COMPILER_OPTIONS)  # Triton 3.6's ptxas otherwise caps registers at 128 or 168 and spills


def quantize_keys(keys: torch.Tensor, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None = None,
                  idx_per_token: torch.Tensor | None = None, mean: torch.Tensor | None = None):
    """``keys`` ``[b, h, n, d]`` less ``mean`` ``[b, h, 1, d]`` (None: 0), sketch ``matrix`` ``[m, d]`` float32; with
    outliers, ``idx_per_token`` uint8 ``[b, h, n, k]`` and ``outlier_matrix`` ``[mo, d]`` (None: exact outliers).
    Returns signs, norms, outlier signs, outlier norms and outlier residuals (None where unused), laid out as
    ``qjl.keys.QuantizedKeyBlock``."""
    b, h, n, d = keys.shape
    keys = head_rows(keys)
    # Subtracting 0 leaves every key as it is, so one kernel serves centred and plain keys.
    mean = keys.new_zeros(b * h, d, dtype=torch.float32) if mean is None else mean.float().reshape(b * h, d)
    k = 0 if idx_per_token is None else idx_per_token.shape[-1]
    exact = bool(k) and outlier_matrix is None
    sketch_dim = matrix.shape[0]
    outlier_dim = outlier_matrix.shape[0] if k and not exact else 8
    signs = keys.new_empty(b, h, n, sketch_dim // 8, dtype=torch.uint8)
    norms = keys.new_empty(b, h, n, dtype=torch.float16)
    osigns = onorms = oresiduals = None
    if exact:
        oresiduals = keys.new_empty(b, h, n, k, dtype=torch.float16)
    elif k:
        osigns = keys.new_empty(b, h, n, outlier_dim // 8, dtype=torch.uint8)
        onorms = torch.empty_like(norms)
    if n:
        unused = signs  # pointers of the branches the constexprs compile away are never read
        grid = (b * h, triton.cdiv(n, BLOCK_TOKENS))
        quantize_keys_kernel[grid](keys, mean.contiguous(), idx_per_token.contiguous() if k else unused,
                                   matrix.contiguous(),
                                   matrix if outlier_matrix is None else outlier_matrix.contiguous(), signs, norms,
                                   unused if osigns is None else osigns, unused if onorms is None else onorms,
                                   unused if oresiduals is None else oresiduals, n, keys.stride(0),
                                   sketch_scale(matrix),
                                   **launch_config(d, sketch_dim, outlier_dim, k, exact))
    return signs, norms, osigns, onorms, oresiduals
