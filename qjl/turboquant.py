"""TurboQuant-style KV cache (Zandieh, Daliri, Hadian, Mirrokni 2025, arXiv 2504.19874).

A seeded random rotation ``R`` (Haar, one per layer) makes every coordinate of ``R x / ||x||`` follow the same known
law: the coordinate of a uniform point on the unit sphere, density ``~ (1 - u^2)^((d - 3) / 2)``, close to
``N(0, 1/d)``. Each coordinate is then quantized with the Lloyd-Max codebook of that law (computed once per bit width
and head dim, cached), and ``||x||`` is stored in fp16: the MSE quantizer.

Values use the MSE quantizer at ``bits`` bits. Keys use the inner-product variant: the MSE quantizer at ``bits - 1``
bits, plus a 1-bit QJL sketch (``qjl.sketch.QJLSketch``, sketch dim = head dim) of the residual ``r = k - k_mse``
with ``||r||``. The score ``<q, k_mse> + est(q, r)`` is unbiased because the QJL estimate of ``<q, r>`` is.
``unbiased_keys=False`` is the paper's other variant: keys through the MSE quantizer at ``bits`` bits, biased but
with a smaller error (at a few bits the sketch's variance exceeds the bias it removes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .config import FP16_BITS
from .kivi import pack_codes
from .layer import CompressedLayer
from .sketch import QJLSketch, QuantizedKeys, chi_mean, sketch_matrix
from .values import unpack_codes

GRID_POINTS = 200_001
LLOYD_ITERATIONS = 300


def coordinate_density(grid: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unnormalised density of ``sqrt(dim) * u`` for ``u`` a coordinate of a uniform unit vector in ``dim``
    dimensions (unit variance); ``dim=None`` is its limit, the standard Gaussian."""
    if dim is None:
        return torch.exp(-grid.square() / 2)
    return (1 - grid.square() / dim).clamp_min(0) ** ((dim - 3) / 2)


@functools.lru_cache(maxsize=None)
def lloyd_max(bits: int, dim: int | None = None) -> tuple[float, ...]:
    """The ``2^bits`` Lloyd-Max levels (MSE-optimal scalar quantizer) of ``coordinate_density``, ascending.

    Lloyd's iteration on a fine grid: boundaries are midpoints of the levels, levels the conditional means of their
    cells. Computed once per ``(bits, dim)``.
    """
    limit = 10.0 if dim is None else math.sqrt(dim)
    grid = torch.linspace(-limit, limit, GRID_POINTS, dtype=torch.float64)
    mass = coordinate_density(grid, dim)
    cum_mass = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    cum_moment = torch.cat([mass.new_zeros(1), (mass * grid).cumsum(0)])
    quantiles = (torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits
    levels = grid[torch.searchsorted(cum_mass[1:] / cum_mass[-1], quantiles)]
    for _ in range(LLOYD_ITERATIONS):
        edges = torch.searchsorted(grid, (levels[1:] + levels[:-1]) / 2)
        edges = torch.cat([edges.new_zeros(1), edges, edges.new_full((1,), GRID_POINTS)])
        levels = (cum_moment[edges[1:]] - cum_moment[edges[:-1]]) / (cum_mass[edges[1:]] - cum_mass[edges[:-1]])
    return tuple(levels.tolist())


@dataclass(frozen=True)
class TurboQuantConfig:
    """``bits`` per key coordinate (``bits - 1`` codebook + 1 sketch bit, or a ``bits`` codebook without
    ``unbiased_keys``) and per value coordinate."""

    bits: int = 3
    unbiased_keys: bool = True
    buffer_size: int = 32
    group_size: int = 32
    sink_tokens: int = 0
    seed: int = 42

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5):
            raise ValueError(f"TurboQuantConfig.bits={self.bits!r} is invalid: must be 2, 3, 4 or 5")
        if self.group_size < 1 or self.buffer_size < self.group_size or self.buffer_size % self.group_size:
            raise ValueError(f"TurboQuantConfig: buffer_size={self.buffer_size} must be a positive multiple of "
                             f"group_size={self.group_size}")

    def bits_per_number(self, head_dim: int) -> float:
        """Analytic bits per stored number: key codes and norm (with ``unbiased_keys`` also the residual's signs and
        norm); value codes and norm."""
        key_bits = self.bits + (2 if self.unbiased_keys else 1) * FP16_BITS / head_dim
        value_bits = self.bits + FP16_BITS / head_dim
        return (key_bits + value_bits) / 2


class MSEQuantizer:
    """Rotation plus per-coordinate Lloyd-Max codebook; codes are bit planes (``qjl.values`` layout)."""

    def __init__(self, rotation: torch.Tensor, bits: int):
        self.rotation, self.bits = rotation, bits
        dim = rotation.shape[0]
        levels = torch.tensor(lloyd_max(bits, dim), device=rotation.device) / math.sqrt(dim)
        self.levels, self.boundaries = levels.float(), ((levels[1:] + levels[:-1]) / 2).float()

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[..., d]`` -> packed codes uint8 ``[..., bits * d / 8]`` and norms fp16 ``[...]``."""
        x = x.float()
        norms = x.norm(dim=-1, keepdim=True)
        unit = (x @ self.rotation.T) / norms.clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.bucketize(unit, self.boundaries).to(torch.uint8)
        return pack_codes(codes, self.bits), norms.squeeze(-1).half()

    def rotated(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """The reconstruction in rotated coordinates, ``R x_hat``: float32 ``[..., d]``."""
        return self.levels[unpack_codes(packed, self.bits).long()] * norms.float().unsqueeze(-1)

    def dequantize(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return self.rotated(packed, norms) @ self.rotation


class TurboQuantLayer(CompressedLayer):
    """Keys: (bits-1)-bit MSE quantizer + QJL sketch of the residual (or a bits-bit MSE quantizer); values: bits-bit
    MSE quantizer."""

    def __init__(self, config: TurboQuantConfig, layer_idx: int = 0, **kwargs):
        super().__init__(config.sink_tokens, config.buffer_size, config.group_size, **kwargs)
        self.config, self.layer_idx = config, layer_idx

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        d, seed = key_states.shape[-1], self.config.seed * 100_003 + self.layer_idx
        # A Haar-distributed orthogonal matrix: the QJL sketch's orthogonal block, rows scaled back to unit length.
        rotation = sketch_matrix(d, d, torch.Generator().manual_seed(seed)) / chi_mean(d)
        rotation = rotation.to(self.device)
        unbiased = self.config.unbiased_keys
        self.keys_mse = MSEQuantizer(rotation, self.config.bits - 1 if unbiased else self.config.bits)
        self.values_mse = MSEQuantizer(rotation, self.config.bits)
        self.residual_sketch = QJLSketch(d, d, seed + 50_000, device=self.device) if unbiased else None

    def reset_compressed(self):
        self.state: dict[str, torch.Tensor] = {}

    def compress(self, keys, values):
        key_codes, key_norms = self.keys_mse.quantize(keys)
        value_codes, value_norms = self.values_mse.quantize(values)
        blocks = {"key_codes": key_codes, "key_norms": key_norms, "value_codes": value_codes,
                  "value_norms": value_norms}
        if self.residual_sketch is not None:
            residual = keys.float() - self.keys_mse.dequantize(key_codes, key_norms)
            blocks["residual_signs"], blocks["residual_norms"] = self.residual_sketch.quantize(residual)
        for name, tensor in blocks.items():
            self.state[name] = torch.cat([self.state[name], tensor], dim=2) if name in self.state else tensor

    def compressed_scores(self, query):
        if not self.n_compressed:
            return query.new_zeros(*query.shape[:-1], 0)
        s = self.state
        rotated_keys = self.keys_mse.rotated(s["key_codes"], s["key_norms"])
        mse_scores = (query @ self.keys_mse.rotation.T) @ rotated_keys.transpose(-1, -2)
        if self.residual_sketch is None:
            return mse_scores
        return mse_scores + self.residual_sketch.score(query, QuantizedKeys(s["residual_signs"], s["residual_norms"]))

    def compressed_output(self, probs):
        if not self.n_compressed:
            return probs.new_zeros(*probs.shape[:-1], self.head_dim)
        # Weight the values in rotated coordinates and rotate back once.
        rotated_values = self.values_mse.rotated(self.state["value_codes"], self.state["value_norms"])
        return (probs @ rotated_values) @ self.values_mse.rotation

    def compressed_state(self):
        return dict(self.state)

    def set_compressed_state(self, state):
        self.state = state

    def crop_compressed(self, n_keep):
        self.state = {name: tensor[:, :, :n_keep] for name, tensor in self.state.items()}
