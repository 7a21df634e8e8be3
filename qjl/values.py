"""Per-token asymmetric quantization of values in channel groups, packed as bit planes.

Reference of the value kernels. A ``[..., d]`` tensor becomes codes in ``[0, 2^b - 1]`` with one float16 scale and
minimum per group of ``group_size`` channels: ``x ~= code * scale + minimum``. Codes are stored as ``b`` bit planes,
each packed 8 channels a byte: ``packed[..., p * d / 8 + j]`` bit ``i`` is bit ``p`` of the code of channel ``8 j + i``.

``QJLLayer`` keeps the packed bytes in blocks of ``TOKEN_BLOCK`` tokens, each byte's tokens side by side
(``block_tokens``): the fused decode kernel reads a byte column of a tile's tokens in one copy, and hands the tensor
cores four tokens' codes in one register (``kernels.decode_attention``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .sketch import pack_bits, unpack_bits, unpack_bits_as

TOKEN_BLOCK = 16


class QuantizedValues(NamedTuple):
    packed: torch.Tensor  # uint8 [..., n, bits * d // 8]
    scales: torch.Tensor  # float16 [..., n, d // group_size]
    minimums: torch.Tensor  # float16 [..., n, d // group_size]


def quantize_codes(x: torch.Tensor, bits: int, group_size: int):
    """Integer codes (uint8) and float16 scale and minimum per group along the last dimension."""
    grouped = x.float().reshape(*x.shape[:-1], -1, group_size)
    minimums = grouped.amin(-1).half()
    maximums = grouped.amax(-1)
    scales = ((maximums - minimums.float()) / (2**bits - 1)).half()
    # A constant group has scale 0; dividing by 1 instead gives code 0, which reconstructs the constant.
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(maximums)).unsqueeze(-1)
    codes = ((grouped - minimums.float().unsqueeze(-1)) / safe).round().clamp(0, 2**bits - 1)
    return codes.to(torch.uint8).reshape(x.shape), scales, minimums


def quantize_values(values: torch.Tensor, bits: int, group_size: int) -> QuantizedValues:
    codes, scales, minimums = quantize_codes(values, bits, group_size)
    planes = torch.stack([(codes >> p) & 1 for p in range(bits)], dim=-2).bool()  # [..., bits, d]
    return QuantizedValues(pack_bits(planes).flatten(-2), scales, minimums)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    planes = unpack_bits(packed.reshape(*packed.shape[:-1], bits, -1)).to(torch.uint8)  # [..., bits, d]
    weights = torch.tensor([1 << p for p in range(bits)], dtype=torch.uint8, device=packed.device)
    return (planes * weights.unsqueeze(-1)).sum(-2, dtype=torch.uint8)


def dequantize_values(quantized: QuantizedValues, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    planes = unpack_bits_as(quantized.packed.reshape(*quantized.packed.shape[:-1], bits, -1))  # [..., bits, d]
    codes = planes[..., 0, :] if bits == 1 else torch.einsum(
        "...pd,p->...d", planes, torch.tensor([float(1 << p) for p in range(bits)], device=planes.device))
    group_size = codes.shape[-1] // quantized.scales.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], -1, group_size)
    x = grouped * quantized.scales.float().unsqueeze(-1) + quantized.minimums.float().unsqueeze(-1)
    return x.reshape(codes.shape).to(dtype)


def block_tokens(packed: torch.Tensor) -> torch.Tensor:
    """Per-token bytes ``[..., n, c]`` -> ``[..., ceil(n / TOKEN_BLOCK), c, TOKEN_BLOCK]``: byte ``c`` of token ``t``
    at ``[..., t // TOKEN_BLOCK, c, t % TOKEN_BLOCK]``; the last block's missing tokens are zeros."""
    n = packed.shape[-2]
    padded = torch.nn.functional.pad(packed, (0, 0, 0, -n % TOKEN_BLOCK))
    return padded.unflatten(-2, (-1, TOKEN_BLOCK)).transpose(-1, -2).contiguous()


def unblock_tokens(blocked: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``block_tokens``: the first ``n`` tokens, ``[..., n, c]``."""
    return blocked.transpose(-1, -2).flatten(-3, -2)[..., :n, :]


def append_blocked(blocked: torch.Tensor | None, n: int, packed: torch.Tensor) -> torch.Tensor:
    """``blocked`` (``n`` tokens, or None) with the per-token bytes ``packed`` after them; only a partly filled last
    block is unblocked again."""
    if blocked is None:
        return block_tokens(packed)
    whole, filled = divmod(n, TOKEN_BLOCK)
    if filled:
        packed = torch.cat([unblock_tokens(blocked[..., whole:whole + 1, :, :], filled), packed], dim=-2)
    return torch.cat([blocked[..., :whole, :, :], block_tokens(packed)], dim=-3)
