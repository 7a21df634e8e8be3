"""The QJL cache layer and the cache object that plugs into transformers' ``generate``."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from . import backend
from .config import QJLConfig
from .keys import QuantizedKeyBlock, outlier_channels, per_token
from .layer import CompressedLayer
from .sketch import QJLSketch
from .values import TOKEN_BLOCK, QuantizedValues, append_blocked, dequantize_values, unblock_tokens

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Per-token state tensors (tokens on dim 2); `outlier_idx` is per group, `key_mean` per head, and `value_packed` per
# block of TOKEN_BLOCK tokens (`qjl.values.block_tokens`).
TOKEN_TENSORS = ("signs", "norms", "outlier_signs", "outlier_norms", "outlier_residuals", "value_scales",
                 "value_minimums")
KEY_TENSORS = ("signs", "norms", "outlier_idx", "outlier_signs", "outlier_norms", "outlier_residuals")


class QJLLayer(CompressedLayer):
    """QJL keys (signs of a seeded projection, norms, optional outlier channels and centring) and few-bit values."""

    def __init__(self, config: QJLConfig, layer_idx: int, **kwargs):
        super().__init__(config.sink_tokens, config.buffer_size, config.group_size, config.buffer_keep, **kwargs)
        self.config, self.layer_idx = config, layer_idx
        self.sketch = self.outlier_sketch = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        config, d = self.config, key_states.shape[-1]
        config.check_head_dim(d)
        seed = config.seed * 100_003 + self.layer_idx
        self.sketch = QJLSketch(d, config.layer_sketch_dim(self.layer_idx), seed, config.orthogonal, self.device)
        if config.n_outliers and not config.exact_outliers:
            self.outlier_sketch = QJLSketch(d, config.outlier_sketch_dim, seed + 50_000, config.orthogonal,
                                            self.device)

    def reset_compressed(self):
        self.state: dict[str, torch.Tensor] = {}
        self.key_mean = None

    def start(self, keys, values):
        if self.config.center_keys:
            self.key_mean = keys.mean(dim=-2, keepdim=True, dtype=torch.float32).to(keys.dtype)  # no fp32 copy

    def compress(self, keys, values):
        config, mean = self.config, self.key_mean  # the keys are centred where they are read, not copied centred
        idx_per_token = None
        if config.n_outliers:
            filled = self.n_compressed % config.group_size
            fresh = keys[:, :, (config.group_size - filled) % config.group_size:] if filled else keys
            new_idx = outlier_channels(fresh, config.group_size, config.n_outliers, mean)
            # A group left short by `crop` is completed with its own channels.
            group_idx = torch.cat([self.state["outlier_idx"][:, :, -1:], new_idx], 2) if filled else new_idx
            idx_per_token = per_token(group_idx, keys.shape[-2], config.group_size, filled)
            self._append("outlier_idx", new_idx)
        block = backend.quantize_keys(keys, self.sketch, self.outlier_sketch, idx_per_token, mean)
        quantized_values = backend.quantize_values(values, config.value_bits, config.value_group_size)
        for name, tensor in zip(KEY_TENSORS, block):
            if tensor is not None and name != "outlier_idx":
                self._append(name, tensor)
        self.state["value_packed"] = append_blocked(self.state.get("value_packed"), self.n_compressed,
                                                    quantized_values.packed)
        self._append("value_scales", quantized_values.scales)
        self._append("value_minimums", quantized_values.minimums)

    def _append(self, name, tensor):
        self.state[name] = torch.cat([self.state[name], tensor], dim=2) if name in self.state else tensor

    def keys_block(self) -> QuantizedKeyBlock:
        return QuantizedKeyBlock(*(self.state.get(name) for name in KEY_TENSORS))

    def compressed_scores(self, query):
        if not self.n_compressed:
            return query.new_zeros(*query.shape[:-1], 0)
        return backend.compressed_scores(query, self.keys_block(), self.sketch, self.outlier_sketch,
                                         self.config.group_size, self.key_mean)

    def attend(self, query, attention_mask, scaling):
        out = backend.decode_attention(self, query, attention_mask, scaling)  # fused kernel for a decode token
        return super().attend(query, attention_mask, scaling) if out is None else out

    def compressed_output(self, probs):
        if not self.n_compressed:
            return probs.new_zeros(*probs.shape[:-1], self.head_dim)
        s = self.state
        packed = unblock_tokens(s["value_packed"], self.n_compressed)
        values = dequantize_values(QuantizedValues(packed, s["value_scales"], s["value_minimums"]),
                                   self.config.value_bits)
        return probs @ values

    def compressed_state(self):
        state = dict(self.state)
        if self.key_mean is not None:
            state["key_mean"] = self.key_mean
        return state

    def set_compressed_state(self, state):
        self.key_mean = state.pop("key_mean", None)
        self.state = state

    def crop_compressed(self, n_keep):
        for name in TOKEN_TENSORS:
            if name in self.state:
                self.state[name] = self.state[name][:, :, :n_keep]
        if "value_packed" in self.state:
            self.state["value_packed"] = self.state["value_packed"][:, :, :-(-n_keep // TOKEN_BLOCK)]
        if "outlier_idx" in self.state:
            self.state["outlier_idx"] = self.state["outlier_idx"][:, :, :-(-n_keep // self.config.group_size)]


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(model_or_config) -> None:
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {model_type!r} is not supported by the compressed caches; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (the Llama, Mistral, Qwen2 and Qwen3 families)")


class CompressedCache(Cache):
    """A transformers ``Cache`` of compressed layers, one per decoder layer, with byte accounting."""

    def __init__(self, model, layers: list[CompressedLayer]):
        from .attention import install

        check_supported(model)
        install(model)
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache holds for its tokens."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache would hold for the same tokens."""
        return sum(layer.fp16_nbytes() for layer in self.layers)


class QJLCache(CompressedCache):
    """QJL-compressed KV cache: ``model.generate(ids, past_key_values=QJLCache(model, config))`` (``cache=`` in
    later 5.x releases: ``qjl.runner.cache_kwarg``)."""

    def __init__(self, model, config: QJLConfig | str | None = None):
        n_layers = text_config(model).num_hidden_layers
        if config is None or isinstance(config, str):
            config = QJLConfig.preset(config or "3bit", head_dim=model_head_dim(model))
        self.config = config
        super().__init__(model, [QJLLayer(config, i) for i in range(n_layers)])


def model_head_dim(model) -> int:
    config = text_config(model)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
