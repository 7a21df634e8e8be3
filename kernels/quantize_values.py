"""Value quantization: per-token asymmetric ``bits``-bit codes in channel groups, fp16 scale and minimum per group,
codes packed as bit planes. Reference: ``qjl.values.quantize_values``."""

import torch
import triton
import triton.language as tl

from .common import COMPILER_OPTIONS, head_rows, pack_rows, pow2

BLOCK_TOKENS = 32


@triton.jit
def _round_half_even(x):
    # torch.round rounds ties to even; floor(x + 0.5) would round them up.
    r = tl.floor(x + 0.5)
    tie_odd = ((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(tie_odd, r - 1.0, r)


@triton.jit
def quantize_values_kernel(values_ptr, packed_ptr, scales_ptr, mins_ptr, n_rows, tokens_per_head, head_stride,
                           D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """``values`` ``[heads, tokens_per_head, D]`` (heads ``head_stride`` apart, so a slice of the cache's buffer is
    read in place) -> packed ``[rows, BITS * D / 8]``, scales and minimums ``[rows, D / GROUP]``, rows = heads x
    tokens."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < n_rows
    offs_d = tl.arange(0, D_PAD)
    inside = ok[:, None] & (offs_d[None, :] < D)
    source = (rows // tokens_per_head).to(tl.int64) * head_stride + (rows % tokens_per_head) * D
    x = tl.load(values_ptr + source[:, None] + offs_d[None, :], mask=inside, other=0.0).to(tl.float32)
    grouped = tl.reshape(x, (BLOCK_N, D_PAD // GROUP, GROUP))
    # Padding channels (head dims that are not powers of two) stay out of the minimum and maximum.
    grouped_in = tl.reshape(tl.broadcast_to(offs_d[None, :] < D, (BLOCK_N, D_PAD)), (BLOCK_N, D_PAD // GROUP, GROUP))
    minimum = tl.min(tl.where(grouped_in, grouped, float("inf")), axis=2).to(tl.float16).to(tl.float32)
    maximum = tl.max(tl.where(grouped_in, grouped, float("-inf")), axis=2)
    levels: tl.constexpr = (1 << BITS) - 1
    # IEEE division (div_rn) as torch's: Triton's default fp32 division is approximate, which moves codes that sit
    # on a rounding boundary.
    scale = tl.math.div_rn(maximum - minimum, levels).to(tl.float16).to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)  # a constant group gets code 0, which reconstructs it
    codes = _round_half_even(tl.math.div_rn(grouped - minimum[:, :, None], safe[:, :, None]))
    codes = tl.reshape(tl.minimum(tl.maximum(codes, 0.0), levels), (BLOCK_N, D_PAD)).to(tl.int32)
    offs_g = tl.arange(0, D_PAD // GROUP)
    group_ok = ok[:, None] & (offs_g[None, :] < D // GROUP)
    tl.store(scales_ptr + rows[:, None] * (D // GROUP) + offs_g[None, :], scale.to(tl.float16), mask=group_ok)
    tl.store(mins_ptr + rows[:, None] * (D // GROUP) + offs_g[None, :], minimum.to(tl.float16), mask=group_ok)
    offs_b = tl.arange(0, D_PAD // 8)
    byte_ok = ok[:, None] & (offs_b[None, :] < D // 8)
    for plane in tl.static_range(BITS):
        tl.store(packed_ptr + rows[:, None] * (BITS * D // 8) + plane * (D // 8) + offs_b[None, :],
                 pack_rows((codes >> plane) & 1, BLOCK_N, D_PAD // 8), mask=byte_ok)


def launch_config(head_dim: int, bits: int, group_size: int) -> dict:
    """The constexprs the launcher compiles for these shapes (also what ``kernels-compile`` checks)."""
    # 8 warps from head dim 256 on, where a tile of 4 warps spills.
    return dict(D=head_dim, D_PAD=pow2(head_dim, 16), GROUP=group_size, BITS=bits, BLOCK_N=BLOCK_TOKENS,
                num_warps=8 if head_dim >= 256 else 4, **COMPILER_OPTIONS)


def quantize_values(values: torch.Tensor, bits: int, group_size: int):
    """``values`` ``[..., d]`` -> (packed uint8 ``[..., bits d / 8]``, scales, minimums fp16 ``[..., d / group]``)."""
    d = values.shape[-1]
    packed = values.new_empty(*values.shape[:-1], bits * d // 8, dtype=torch.uint8)
    scales = values.new_empty(*values.shape[:-1], d // group_size, dtype=torch.float16)
    minimums = torch.empty_like(scales)
    rows = values.numel() // d
    if rows:
        heads = head_rows(values)
        grid = (triton.cdiv(rows, BLOCK_TOKENS),)
        quantize_values_kernel[grid](heads, packed, scales, minimums, rows, heads.shape[1], heads.stride(0),
                                     **launch_config(d, bits, group_size))
    return packed, scales, minimums
