"""QJL settings, their validation, named presets and the analytic bit count."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Bytes of the stored per-token constants (norms, value scales and minimums) and of an outlier index.
FP16_BITS = 16
INDEX_BITS = 8
VALUE_BITS_ALLOWED = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class QJLConfig:
    """Settings of the QJL key-value cache.

    Keys: ``sign(S k)`` with ``S`` a ``sketch_dim x head_dim`` seeded Gaussian (orthogonalised) matrix, plus the
    key norm. Per group of ``group_size`` tokens and KV head the ``n_outliers`` channels of largest norm are split off
    and sketched by their own ``outlier_sketch_dim`` sketch. The first ``initial_layers`` layers use
    ``initial_sketch_dim`` instead of ``sketch_dim``. Values: per-token asymmetric ``value_bits`` quantization in groups
    of ``value_group_size`` channels. The newest tokens (fewer than ``buffer_size``) and the first ``sink_tokens``
    tokens stay in full precision; a flush compresses all buffered tokens but the newest ``buffer_keep``.
    ``center_keys`` sketches ``k - mean`` and adds ``q . mean`` back exactly.
    ``exact_outliers`` stores the outlier channels as fp16 numbers instead of sketching them: ``n_outliers * 16``
    bits, which for 4 channels costs less than a 64-bit outlier sketch and its norm, and scores them without error.
    """

    sketch_dim: int = 256
    outlier_sketch_dim: int = 64
    n_outliers: int = 0
    group_size: int = 32
    value_bits: int = 2
    value_group_size: int = 32
    buffer_size: int = 128
    buffer_keep: int = 0
    initial_layers: int = 0
    initial_sketch_dim: int = 512
    sink_tokens: int = 0
    center_keys: bool = False
    exact_outliers: bool = False
    orthogonal: bool = True
    seed: int = 42

    def __post_init__(self):
        def require(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"QJLConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        def positive_multiple_of_8(field: str):
            value = getattr(self, field)
            require(isinstance(value, int) and 8 <= value <= 8192 and value % 8 == 0, field,
                    "must be a multiple of 8 between 8 and 8192")

        positive_multiple_of_8("sketch_dim")
        positive_multiple_of_8("outlier_sketch_dim")
        positive_multiple_of_8("initial_sketch_dim")
        require(isinstance(self.n_outliers, int) and 0 <= self.n_outliers <= 64, "n_outliers",
                "must be an integer from 0 to 64 (and less than the head dim)")
        require(isinstance(self.group_size, int) and 1 <= self.group_size <= 1024, "group_size",
                "must be an integer from 1 to 1024")
        require(self.value_bits in VALUE_BITS_ALLOWED, "value_bits", f"must be one of {VALUE_BITS_ALLOWED}")
        require(isinstance(self.value_group_size, int) and self.value_group_size >= 2
                and self.value_group_size & (self.value_group_size - 1) == 0, "value_group_size",
                "must be a power of two of at least 2 that divides the head dim")
        require(isinstance(self.buffer_size, int) and self.buffer_size >= self.group_size
                and self.buffer_size % self.group_size == 0 and self.buffer_size <= 8192, "buffer_size",
                f"must be a multiple of group_size ({self.group_size}) up to 8192")
        require(isinstance(self.buffer_keep, int) and 0 <= self.buffer_keep < self.buffer_size, "buffer_keep",
                f"must be an integer from 0 to buffer_size - 1 ({self.buffer_size - 1})")
        require(isinstance(self.initial_layers, int) and 0 <= self.initial_layers <= 1024, "initial_layers",
                "must be an integer from 0 to 1024")
        require(isinstance(self.sink_tokens, int) and 0 <= self.sink_tokens <= 1024, "sink_tokens",
                "must be an integer from 0 to 1024")
        require(isinstance(self.center_keys, bool), "center_keys", "must be True or False")
        require(isinstance(self.exact_outliers, bool), "exact_outliers", "must be True or False")
        require(isinstance(self.orthogonal, bool), "orthogonal", "must be True or False")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be a non-negative integer")

    def replace(self, **changes) -> "QJLConfig":
        return dataclasses.replace(self, **changes)

    def sliding(self) -> "QJLConfig":
        """These settings with a sliding buffer: a flush compresses all but one group, so the newest
        ``buffer_size - group_size`` to ``buffer_size - 1`` tokens always stay exact."""
        return self.replace(buffer_keep=self.buffer_size - self.group_size)

    def check_head_dim(self, head_dim: int) -> None:
        """Checks the settings that depend on the model's head dim."""
        if head_dim % 8:
            raise ValueError(f"head dim {head_dim} is not supported: it must be a multiple of 8")
        if self.n_outliers >= head_dim:
            raise ValueError(f"QJLConfig.n_outliers={self.n_outliers} is invalid: must be less than the head dim "
                             f"({head_dim})")
        if head_dim % self.value_group_size:
            raise ValueError(f"QJLConfig.value_group_size={self.value_group_size} is invalid: must divide the head "
                             f"dim ({head_dim})")

    def layer_sketch_dim(self, layer_idx: int) -> int:
        return self.initial_sketch_dim if layer_idx < self.initial_layers else self.sketch_dim

    def key_bits_per_token(self, layer_idx: int) -> float:
        """Bits of one key of one head once quantized: signs, norms and the group's outlier indices."""
        bits = self.layer_sketch_dim(layer_idx) + FP16_BITS
        if self.n_outliers:
            outlier_bits = self.n_outliers * FP16_BITS if self.exact_outliers else self.outlier_sketch_dim + FP16_BITS
            bits += outlier_bits + self.n_outliers * INDEX_BITS / self.group_size
        return bits

    def value_bits_per_token(self, head_dim: int) -> float:
        """Bits of one value of one head once quantized: codes plus one fp16 scale and minimum per group."""
        return head_dim * self.value_bits + 2 * FP16_BITS * head_dim / self.value_group_size

    def bits_per_fpn(self, head_dim: int, num_layers: int | None = None) -> float:
        """Average bits per stored number (keys and values) of the quantized tokens.

        With ``num_layers`` the average covers the larger sketch of the initial layers; without, it is the figure of
        the other layers. Sink and buffered tokens (fp16) and the per-head mean key come on top; the cache's
        ``nbytes()`` counts them.
        """
        self.check_head_dim(head_dim)
        layers = range(num_layers) if num_layers else [self.initial_layers]
        key_bits = sum(self.key_bits_per_token(i) for i in layers) / len(layers)
        return (key_bits + self.value_bits_per_token(head_dim)) / (2 * head_dim)

    @classmethod
    def preset(cls, name: str, head_dim: int = 128) -> "QJLConfig":
        """Named settings, scaled to ``head_dim``; see ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown QJL preset {name!r}; known presets: {', '.join(PRESETS)}")
        config = PRESETS[name](head_dim)
        config.check_head_dim(head_dim)
        return config


def _paper(head_dim: int) -> QJLConfig:
    # The reference code's Llama settings for head dim 128 (sketch 256, 512 in the first layers, 8 outlier channels
    # with a sketch of their own, 2-bit values in groups of 32, buffer 128), scaled with the head dim.
    return QJLConfig(sketch_dim=2 * head_dim, outlier_sketch_dim=2 * head_dim, n_outliers=max(1, head_dim // 16),
                     group_size=32, value_bits=2, value_group_size=32, buffer_size=128, initial_layers=15,
                     initial_sketch_dim=4 * head_dim, sink_tokens=0, center_keys=False, seed=42)


def _3bit(head_dim: int) -> QJLConfig:
    # Chosen on the embedded model (README, "Choosing the 3bit preset"): a 2d-bit sketch of the inliers, d/16 outlier
    # channels kept exactly, 2-bit values in groups of d, 4 sink tokens and centred keys: 2.88 bits per number at head
    # dim 64, about 3.1 with the buffer at 8k tokens.
    return QJLConfig(sketch_dim=2 * head_dim, n_outliers=max(1, head_dim // 16), exact_outliers=True, group_size=32,
                     value_bits=2, value_group_size=head_dim, buffer_size=128, initial_layers=0, sink_tokens=4,
                     center_keys=True, seed=42)


PRESETS = {"paper": _paper, "3bit": _3bit}
