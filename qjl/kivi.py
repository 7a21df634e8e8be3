"""KIVI-style KV cache (Liu et al. 2024, arXiv 2402.02750): asymmetric few-bit keys per channel, values per token.

Keys: each group of ``group_size`` tokens is quantized per channel, ``k ~= code * scale + minimum`` with one fp16
scale and minimum per group and channel (key outliers sit in a few channels, so per-channel ranges stay tight).
Values: per token in groups of ``value_group_size`` channels (``qjl.values``). The newest tokens stay exact in the
layer's buffer, the paper's full-precision residual. Key codes are stored per token, as bit planes packed 8 channels
a byte, like the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FP16_BITS
from .layer import CompressedLayer
from .sketch import pack_bits
from .values import QuantizedValues, dequantize_values, quantize_codes, quantize_values, unpack_codes


@dataclass(frozen=True)
class KIVIConfig:
    bits: int = 2
    group_size: int = 32
    value_group_size: int = 32
    buffer_size: int = 128
    sink_tokens: int = 0

    def __post_init__(self):
        if self.bits not in (1, 2, 3, 4, 8):
            raise ValueError(f"KIVIConfig.bits={self.bits!r} is invalid: must be one of 1, 2, 3, 4, 8")
        if self.group_size < 1 or self.buffer_size < self.group_size or self.buffer_size % self.group_size:
            raise ValueError(f"KIVIConfig: buffer_size={self.buffer_size} must be a positive multiple of "
                             f"group_size={self.group_size}")

    def bits_per_number(self, head_dim: int) -> float:
        """Analytic bits per stored number of the quantized tokens: codes plus fp16 scale and minimum per group."""
        key_bits = self.bits + 2 * FP16_BITS / self.group_size
        value_bits = self.bits + 2 * FP16_BITS / self.value_group_size
        return (key_bits + value_bits) / 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., d]`` -> ``bits`` bit planes packed 8 channels a byte (the layout of ``qjl.values``)."""
    planes = torch.stack([(codes >> p) & 1 for p in range(bits)], dim=-2).bool()
    return pack_bits(planes).flatten(-2)


def encode(keys: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``keys`` under given scales and minimums (broadcast), clamped to the ``bits`` range."""
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    return ((keys.float() - minimums.float()) / safe).round().clamp(0, 2**bits - 1).to(torch.uint8)


class KIVILayer(CompressedLayer):
    """Per-channel keys over token groups, per-token values, exact sink and residual buffer."""

    def __init__(self, config: KIVIConfig, layer_idx: int = 0, **kwargs):
        super().__init__(config.sink_tokens, config.buffer_size, config.group_size, **kwargs)
        self.config, self.layer_idx = config, layer_idx

    def reset_compressed(self):
        self.state: dict[str, torch.Tensor] = {}

    def compress(self, keys, values):
        config, group = self.config, self.config.group_size
        filled = self.n_compressed % group
        codes = []
        if filled:  # a group left short by `crop` is completed under its own scale and minimum
            head, keys = keys[:, :, :group - filled], keys[:, :, group - filled:]
            codes.append(encode(head, self.state["key_scales"][:, :, -1:], self.state["key_minimums"][:, :, -1:],
                                config.bits))
        if keys.shape[-2]:
            b, h, n, d = keys.shape
            # [b, h, groups, d, group]: quantize_codes works along the last dim, so tokens go last.
            by_channel = keys.reshape(b, h, n // group, group, d).transpose(-1, -2)
            group_codes, scales, minimums = quantize_codes(by_channel, config.bits, group)
            codes.append(group_codes.transpose(-1, -2).reshape(b, h, n, d))
            self._append("key_scales", scales.squeeze(-1))
            self._append("key_minimums", minimums.squeeze(-1))
        self._append("key_packed", pack_codes(torch.cat(codes, dim=2), config.bits))
        for name, tensor in zip(("value_packed", "value_scales", "value_minimums"),
                                quantize_values(values, config.bits, config.value_group_size)):
            self._append(name, tensor)

    def _append(self, name, tensor):
        self.state[name] = torch.cat([self.state[name], tensor], dim=2) if name in self.state else tensor

    def dequantized_keys(self) -> torch.Tensor:
        """float32 ``[b, h, n_compressed, d]``."""
        s, group = self.state, self.config.group_size
        codes = unpack_codes(s["key_packed"], self.config.bits).float()
        index = torch.arange(codes.shape[2], device=codes.device) // group
        return codes * s["key_scales"][:, :, index].float() + s["key_minimums"][:, :, index].float()

    def dequantized_values(self) -> torch.Tensor:
        s = self.state
        return dequantize_values(QuantizedValues(s["value_packed"], s["value_scales"], s["value_minimums"]),
                                 self.config.bits)

    def compressed_scores(self, query):
        if not self.n_compressed:
            return query.new_zeros(*query.shape[:-1], 0)
        return query @ self.dequantized_keys().transpose(-1, -2)

    def compressed_output(self, probs):
        if not self.n_compressed:
            return probs.new_zeros(*probs.shape[:-1], self.head_dim)
        return probs @ self.dequantized_values()

    def compressed_state(self):
        return dict(self.state)

    def set_compressed_state(self, state):
        self.state = state

    def crop_compressed(self, n_keep):
        groups = -(-n_keep // self.config.group_size)
        for name in self.state:
            keep = groups if name in ("key_scales", "key_minimums") else n_keep
            self.state[name] = self.state[name][:, :, :keep]
