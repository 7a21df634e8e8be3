"""Key quantization in one pass: split the outlier channels, project by the sketch(es), take signs, pack 8 a byte,
write the norms; with exact outliers (no outlier sketch) the outlier channels are written as fp16 numbers instead.
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

from .common import dot3, head_rows, pack_rows, pow2

BLOCK_TOKENS = 32
BLOCK_SKETCH = 64


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
def _store_exact_outliers(keys_ptr, mean_ptr, idx_ptr, ovalues_ptr, tokens, rows, ok, D: tl.constexpr,
                          K: tl.constexpr, K_PAD: tl.constexpr):
    """The centred ``keys[token, idx[row, k]]`` as fp16 at ``ovalues[row, k]``."""
    offs_k = tl.arange(0, K_PAD)
    inside = ok[:, None] & (offs_k[None, :] < K)
    channels = tl.load(idx_ptr + rows[:, None] * K + offs_k[None, :], mask=inside, other=0).to(tl.int32)
    x = tl.load(keys_ptr + tokens[:, None] * D + channels, mask=inside, other=0.0).to(tl.float32)
    x = x - tl.load(mean_ptr + channels, mask=inside, other=0.0)
    tl.store(ovalues_ptr + rows[:, None] * K + offs_k[None, :], x.to(tl.float16), mask=inside)


@triton.jit
def quantize_keys_kernel(keys_ptr, mean_ptr, idx_ptr, s_ptr, so_ptr, signs_ptr, norms_ptr, osigns_ptr, onorms_ptr,
                         ovalues_ptr, n_tokens, keys_head_stride, D: tl.constexpr, SKETCH: tl.constexpr,
                         OSKETCH: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, EXACT: tl.constexpr,
                         WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One block of tokens of one (batch, head): keys ``[BH, n, D]`` (heads ``keys_head_stride`` apart), mean
    ``[BH, D]``, idx ``[BH, n, K]`` (K = 0: no outliers); ``EXACT``: outlier values ``[BH, n, K]`` instead of outlier
    signs and norms."""
    bh, block = tl.program_id(0), tl.program_id(1)
    tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tokens < n_tokens
    rows = bh * n_tokens + tokens
    keys_ptr += bh.to(tl.int64) * keys_head_stride  # past 2^31 numbers at batch 16, 8 heads, 128k tokens
    mean_ptr += bh * D
    words = _outlier_words(idx_ptr, rows, ok, K, WORDS, BLOCK_N)
    if EXACT:
        _store_exact_outliers(keys_ptr, mean_ptr, idx_ptr, ovalues_ptr, tokens, rows, ok, D, K, K_PAD)
    elif K > 0:
        onorms = _norm(keys_ptr, mean_ptr, words, tokens, ok, D, K, True, WORDS, BLOCK_N)
        tl.store(onorms_ptr + rows, onorms.to(tl.float16), mask=ok)
        _project_pack(keys_ptr, mean_ptr, words, so_ptr, osigns_ptr, tokens, rows, ok, OSKETCH, D, K, True, WORDS,
                      BLOCK_N, BLOCK_M)
    norms = _norm(keys_ptr, mean_ptr, words, tokens, ok, D, K, False, WORDS, BLOCK_N)
    tl.store(norms_ptr + rows, norms.to(tl.float16), mask=ok)
    _project_pack(keys_ptr, mean_ptr, words, s_ptr, signs_ptr, tokens, rows, ok, SKETCH, D, K, False, WORDS, BLOCK_N,
                  BLOCK_M)


def launch_config(head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int,
                  exact_outliers: bool = False) -> dict:
    """The constexprs the launcher compiles for these shapes (also what ``kernels-compile`` checks)."""
    sketched = n_outliers and not exact_outliers
    return dict(D=head_dim, SKETCH=sketch_dim, OSKETCH=outlier_sketch_dim if sketched else 8, K=n_outliers,
                K_PAD=pow2(n_outliers), EXACT=bool(n_outliers and exact_outliers), BLOCK_N=BLOCK_TOKENS,
                BLOCK_M=BLOCK_SKETCH, WORDS=pow2(triton.cdiv(head_dim, 32)), num_warps=4, num_stages=1,
                maxnreg=255)  # Triton 3.6's ptxas otherwise caps registers at 128 or 168 and spills


def quantize_keys(keys: torch.Tensor, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None = None,
                  idx_per_token: torch.Tensor | None = None, mean: torch.Tensor | None = None):
    """``keys`` ``[b, h, n, d]`` less ``mean`` ``[b, h, 1, d]`` (None: 0), sketch ``matrix`` ``[m, d]`` float32; with
    outliers, ``idx_per_token`` uint8 ``[b, h, n, k]`` and ``outlier_matrix`` ``[mo, d]`` (None: exact outliers).
    Returns signs, norms, outlier signs, outlier norms and outlier values (None where unused), laid out as
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
    osigns = onorms = ovalues = None
    if exact:
        ovalues = keys.new_empty(b, h, n, k, dtype=torch.float16)
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
                                   unused if ovalues is None else ovalues, n, keys.stride(0),
                                   **launch_config(d, sketch_dim, outlier_dim, k, exact))
    return signs, norms, osigns, onorms, ovalues
