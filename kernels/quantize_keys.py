"""Key quantization in one pass: split the outlier channels, project by the sketch(es), take signs, pack 8 a byte,
write the norms. Reference: ``qjl.keys.quantize_keys``."""

import torch
import triton
import triton.language as tl

from .common import dot3, pack_rows, pow2

BLOCK_TOKENS = 32
BLOCK_SKETCH = 32  # sketch rows projected at a time: keeps the [tokens, sketch] tile in registers


@triton.jit
def _project_pack(x, s_ptr, signs_ptr, rows, row_ok, SKETCH: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_d = tl.arange(0, D_PAD)
    for start in range(0, SKETCH, BLOCK_M):  # a loop, not unrolled: one chunk of S live at a time
        offs_m = start + tl.arange(0, BLOCK_M)
        s_t = tl.load(s_ptr + offs_m[None, :] * D + offs_d[:, None],
                      mask=(offs_m[None, :] < SKETCH) & (offs_d[:, None] < D), other=0.0)  # S^T [D_PAD, BLOCK_M]
        bits = (dot3(x, s_t) >= 0).to(tl.int32)
        offs_b = start // 8 + tl.arange(0, BLOCK_M // 8)
        tl.store(signs_ptr + rows[:, None] * (SKETCH // 8) + offs_b[None, :], pack_rows(bits, BLOCK_N, BLOCK_M // 8),
                 mask=row_ok[:, None] & (offs_b[None, :] < SKETCH // 8))


@triton.jit
def quantize_keys_kernel(keys_ptr, idx_ptr, s_ptr, so_ptr, signs_ptr, norms_ptr, osigns_ptr, onorms_ptr, n_tokens,
                         D: tl.constexpr, D_PAD: tl.constexpr, SKETCH: tl.constexpr, OSKETCH: tl.constexpr,
                         K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One block of tokens of one (batch, head): keys ``[BH, n, D]``, idx ``[BH, n, K]`` (K = 0: no outliers)."""
    bh, block = tl.program_id(0), tl.program_id(1)
    tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tokens < n_tokens
    rows = bh * n_tokens + tokens
    offs_d = tl.arange(0, D_PAD)
    x = tl.load(keys_ptr + rows[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)
    if K > 0:
        outlier = tl.zeros((BLOCK_N, D_PAD), dtype=tl.int1)
        for k in tl.static_range(K):
            channel = tl.load(idx_ptr + rows * K + k, mask=ok, other=D_PAD).to(tl.int32)
            outlier = outlier | (offs_d[None, :] == channel[:, None])
        x_out = tl.where(outlier, x, 0.0)
        x = tl.where(outlier, 0.0, x)
        tl.store(onorms_ptr + rows, tl.sqrt(tl.sum(x_out * x_out, axis=1)).to(tl.float16), mask=ok)
        _project_pack(x_out, so_ptr, osigns_ptr, rows, ok, OSKETCH, D, D_PAD, BLOCK_N, BLOCK_M)
    tl.store(norms_ptr + rows, tl.sqrt(tl.sum(x * x, axis=1)).to(tl.float16), mask=ok)
    _project_pack(x, s_ptr, signs_ptr, rows, ok, SKETCH, D, D_PAD, BLOCK_N, BLOCK_M)


def launch_config(head_dim: int, sketch_dim: int, outlier_sketch_dim: int, n_outliers: int) -> dict:
    """The constexprs the launcher compiles for these shapes (also what ``kernels-compile`` checks)."""
    return dict(D=head_dim, D_PAD=pow2(head_dim, 16), SKETCH=sketch_dim, OSKETCH=outlier_sketch_dim if n_outliers else 8,
                K=n_outliers, BLOCK_N=BLOCK_TOKENS, BLOCK_M=BLOCK_SKETCH, num_warps=8 if head_dim >= 128 else 4)


def quantize_keys(keys: torch.Tensor, matrix: torch.Tensor, outlier_matrix: torch.Tensor | None = None,
                  idx_per_token: torch.Tensor | None = None):
    """``keys`` ``[b, h, n, d]``, sketch ``matrix`` ``[m, d]`` float32; with outliers, ``outlier_matrix`` ``[mo, d]``
    and ``idx_per_token`` uint8 ``[b, h, n, k]``. Returns signs, norms, outlier signs, outlier norms (the last two
    None without outliers), laid out as ``qjl.keys.QuantizedKeyBlock``."""
    b, h, n, d = keys.shape
    keys = keys.contiguous()
    k = 0 if idx_per_token is None else idx_per_token.shape[-1]
    sketch_dim = matrix.shape[0]
    outlier_dim = outlier_matrix.shape[0] if k else 8
    signs = keys.new_empty(b, h, n, sketch_dim // 8, dtype=torch.uint8)
    norms = keys.new_empty(b, h, n, dtype=torch.float16)
    osigns = onorms = None
    if k:
        osigns = keys.new_empty(b, h, n, outlier_dim // 8, dtype=torch.uint8)
        onorms = torch.empty_like(norms)
    if n:
        unused = signs  # K = 0 compiles the outlier branch away; its pointers are never read
        grid = (b * h, triton.cdiv(n, BLOCK_TOKENS))
        quantize_keys_kernel[grid](keys, idx_per_token.contiguous() if k else unused, matrix.contiguous(),
                                   outlier_matrix.contiguous() if k else matrix, signs, norms,
                                   osigns if k else unused, onorms if k else unused, n,
                                   **launch_config(d, sketch_dim, outlier_dim, k))
    return signs, norms, osigns, onorms
