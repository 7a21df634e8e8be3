"""The QJL sketch: 1-bit signs of a random projection of the keys and the unbiased inner-product estimator.

This is the reference (specification) of the key kernels: bit ``i`` of byte ``j`` along the last dimension holds the
sign of projection ``8 j + i`` (1 for ``>= 0``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

BIT_WEIGHTS = tuple(1 << i for i in range(8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Packs a boolean tensor 8 per byte along its last dimension (a multiple of 8), least significant bit first."""
    if bits.shape[-1] % 8:
        raise ValueError(f"last dimension {bits.shape[-1]} is not a multiple of 8")
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)
    return (grouped * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[..., n]`` to bool ``[..., 8 n]``."""
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-1) & weights).ne(0).reshape(*packed.shape[:-1], -1)


_BIT_TABLES: dict = {}


def unpack_bits_as(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``unpack_bits`` as 0/1 numbers of ``dtype``, by one table lookup per byte (decoding runs this over the whole
    cache at every step, where bitwise unpacking is several times slower)."""
    key = (packed.device, dtype)
    if key not in _BIT_TABLES:
        every_byte = torch.arange(256, dtype=torch.uint8, device=packed.device).unsqueeze(-1)
        _BIT_TABLES[key] = unpack_bits(every_byte).to(dtype)  # [256, 8]
    return _BIT_TABLES[key][packed.long()].reshape(*packed.shape[:-1], -1)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits to +1/-1 of ``dtype``."""
    return unpack_bits_as(packed, dtype) * 2 - 1


def chi_mean(dim: int) -> float:
    """E||g|| for a standard Gaussian vector g of ``dim`` entries."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def sketch_matrix(head_dim: int, sketch_dim: int, generator: torch.Generator, orthogonal: bool = True) -> torch.Tensor:
    """A ``sketch_dim x head_dim`` float32 projection, drawn on the CPU so every device gets the same one.

    Orthogonal: each block of ``head_dim`` rows is an orthogonal basis (QR of a Gaussian block) with rows of length
    ``E||g||``. A Gaussian row is a uniform direction times an independent ``||g||``; fixing the length at its mean
    (the paper scales by ``sqrt(head_dim)``, a bias of about ``1 / (4 head_dim)``) keeps the estimator unbiased.
    """
    gaussian = torch.randn(sketch_dim, head_dim, generator=generator, dtype=torch.float64)
    if not orthogonal:
        return gaussian.float()
    blocks = []
    for start in range(0, sketch_dim, head_dim):
        rows = min(head_dim, sketch_dim - start)
        square = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(square)
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed basis
        blocks.append(q.T[:rows])
    return (torch.cat(blocks) * chi_mean(head_dim)).float()


@functools.lru_cache(maxsize=1024)
def _seeded_matrix(head_dim: int, sketch_dim: int, seed: int, orthogonal: bool, device: str) -> torch.Tensor:
    """One matrix per seed and device, shared by every cache that asks for it (a model's layers draw theirs for each
    new cache; the QR decompositions cost milliseconds per layer). Nothing writes to it."""
    return sketch_matrix(head_dim, sketch_dim, torch.Generator().manual_seed(seed), orthogonal).to(device)


class QuantizedKeys(NamedTuple):
    signs: torch.Tensor  # uint8 [..., n, sketch_dim // 8]
    norms: torch.Tensor  # float16 [..., n]


class QJLSketch:
    """``sign(S k)`` and ``||k||`` per key; ``<q, k> ~= sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>`` (unbiased)."""

    def __init__(self, head_dim: int, sketch_dim: int, seed: int = 42, orthogonal: bool = True,
                 device: torch.device | str | None = None):
        if sketch_dim % 8:
            raise ValueError(f"sketch_dim={sketch_dim} must be a multiple of 8")
        self.head_dim, self.sketch_dim = head_dim, sketch_dim
        self.matrix = _seeded_matrix(head_dim, sketch_dim, seed, orthogonal, str(torch.device(device or "cpu")))
        self.scale = math.sqrt(math.pi / 2) / sketch_dim

    def to(self, device) -> "QJLSketch":
        self.matrix = self.matrix.to(device)
        return self

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.matrix.T

    def quantize(self, keys: torch.Tensor) -> QuantizedKeys:
        return QuantizedKeys(pack_bits(self.project(keys) >= 0), keys.float().norm(dim=-1).half())

    def score_projected(self, projected_query: torch.Tensor, quantized: QuantizedKeys) -> torch.Tensor:
        """Estimates from ``S q`` (float32 ``[..., q, m]``): float32 ``[..., q, n]``."""
        signs = unpack_signs(quantized.signs)
        return (projected_query @ signs.transpose(-1, -2)) * (quantized.norms.float() * self.scale).unsqueeze(-2)

    def score(self, query: torch.Tensor, quantized: QuantizedKeys) -> torch.Tensor:
        """Estimate of ``query @ keys.transpose(-1, -2)``, broadcasting over the leading dimensions."""
        return self.score_projected(self.project(query), quantized)
