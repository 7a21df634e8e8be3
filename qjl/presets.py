"""One registry of KV-cache methods: ``make_cache(model, name)`` builds any of them, ``list_presets()`` describes them.

Every preset is a method with its settings: ``full`` (transformers' ``DynamicCache``), QJL (``qjl.cache``),
KIVI-style (``qjl.kivi``), TurboQuant-style (``qjl.turboquant``) and, where ``optimum-quanto`` is installed,
transformers' own ``QuantizedCache`` (``hf-quanto-*``). Analytic bits per stored number count the quantized tokens
(codes, signs, norms, scales, minimums, indices); the exact sink and buffer tokens come on top, which ``nbytes()``
of a built cache measures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable

from transformers import DynamicCache, QuantizedCache

from .cache import CompressedCache, QJLCache, model_head_dim, text_config
from .config import FP16_BITS, QJLConfig
from .kivi import KIVIConfig, KIVILayer
from .layer import CompressedLayer, tensors_nbytes
from .turboquant import TurboQuantConfig, TurboQuantLayer

EMBEDDED_HEAD_DIM = 64  # SmolLM2-135M, the embedded model


class FullCache(DynamicCache):
    """transformers' full-precision ``DynamicCache`` with the byte accounting of the compressed caches."""

    def __init__(self, model):
        super().__init__(config=text_config(model))

    def nbytes(self) -> int:
        return sum(tensors_nbytes(layer_tensors(layer)) for layer in self.layers)

    def fp16_nbytes(self) -> int:
        return sum(layer.keys.numel() + layer.values.numel() for layer in self.layers if layer.is_initialized) * 2


class KIVICache(CompressedCache):
    """KIVI-style cache: ``KIVICache(model, KIVIConfig(bits=2))``."""

    def __init__(self, model, config: KIVIConfig):
        self.config = config
        n_layers = text_config(model).num_hidden_layers
        super().__init__(model, [KIVILayer(config, i) for i in range(n_layers)])


class TurboQuantCache(CompressedCache):
    """TurboQuant-style cache: ``TurboQuantCache(model, TurboQuantConfig(bits=3))``."""

    def __init__(self, model, config: TurboQuantConfig):
        self.config = config
        n_layers = text_config(model).num_hidden_layers
        super().__init__(model, [TurboQuantLayer(config, i) for i in range(n_layers)])


@dataclass(frozen=True)
class QuantoConfig:
    """transformers' ``QuantizedCache`` on optimum-quanto: ``bits`` per number, one scale and shift per
    ``group_size`` numbers, the newest ``buffer_size`` tokens exact (then the whole cache is re-quantized)."""

    bits: int = 2
    group_size: int = 64
    buffer_size: int = 128

    def bits_per_number(self, head_dim: int) -> float:
        return self.bits + 2 * FP16_BITS / self.group_size


def quanto_available() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:
        return False


class QuantoCache(QuantizedCache):
    """transformers' ``QuantizedCache`` on optimum-quanto, with ``nbytes()``/``fp16_nbytes()`` added."""

    def __init__(self, model, config: QuantoConfig):
        self.config = config
        super().__init__(backend="quanto", config=text_config(model), nbits=config.bits,
                         q_group_size=config.group_size, residual_length=config.buffer_size)

    def nbytes(self) -> int:
        return sum(tensors_nbytes(layer_tensors(layer)) for layer in self.layers)

    def fp16_nbytes(self) -> int:
        # The residual ``keys`` may be an empty 1-d tensor right after a re-quantization; the packed ones keep the shape.
        return 2 * 2 * sum(math.prod(layer._quantized_keys.shape[i] for i in (0, 1, 3)) * layer.get_seq_length()
                           for layer in self.layers if layer.is_initialized)


def layer_tensors(layer):
    """Every tensor a cache layer holds for its tokens: compressed layers' exact sink and buffer and compressed
    state, a ``DynamicLayer``'s keys and values, and quanto's residual plus the inner tensors of its packed ones."""
    if not layer.is_initialized:
        return
    if isinstance(layer, CompressedLayer):
        yield from (layer.sink_keys, layer.sink_values, layer.buffer_keys, layer.buffer_values)
        yield from layer.compressed_state().values()
        return
    yield from (layer.keys, layer.values)
    stack = [getattr(layer, name) for name in ("_quantized_keys", "_quantized_values") if getattr(layer, name, None)
             is not None]
    while stack:
        tensor = stack.pop()
        if hasattr(tensor, "__tensor_flatten__"):
            stack.extend(getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        else:
            yield tensor


def stored_bits(cache, float_bits: int | None = None) -> float:
    """Measured bits per stored number (keys and values) of a built cache, from the tensors it holds.

    ``float_bits=16`` counts floating-point tensors (exact tokens, norms, scales) at 16 bits whatever the model's
    dtype: the figure of an fp16 deployment, measured on a float32 CPU run."""
    total = 0
    for layer in cache.layers:
        for tensor in layer_tensors(layer):
            bits = float_bits if float_bits and tensor.is_floating_point() else 8 * tensor.element_size()
            total += tensor.numel() * bits
    return total / (cache.fp16_nbytes() / 2)  # an fp16 cache holds 2 bytes per number


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # full | qjl | kivi | turboquant | hf-quanto
    settings: Callable[[int], Any]  # head dim -> config (None for full)


PRESET_LIST = [
    Preset("full", "full", lambda head_dim: None),
    Preset("qjl-paper", "qjl", lambda head_dim: QJLConfig.preset("paper", head_dim)),
    Preset("qjl-3bit", "qjl", lambda head_dim: QJLConfig.preset("3bit", head_dim)),
    # The same bits for the compressed tokens; a flush leaves the newest 96-127 tokens exact instead of 0-127.
    Preset("qjl-3bit-sliding", "qjl", lambda head_dim: QJLConfig.preset("3bit", head_dim).sliding()),
    Preset("kivi-2bit", "kivi", lambda head_dim: KIVIConfig(bits=2)),
    Preset("kivi-4bit", "kivi", lambda head_dim: KIVIConfig(bits=4)),
    # Half the scales and minimums of kivi-4bit (4.5 bits a number instead of 5), and the attention sink kept exact.
    Preset("kivi-4bit-g64-sinks", "kivi",
           lambda head_dim: KIVIConfig(bits=4, group_size=64, value_group_size=64, sink_tokens=4)),
    Preset("turboquant-3bit", "turboquant", lambda head_dim: TurboQuantConfig(bits=3)),
    Preset("turboquant-4bit", "turboquant", lambda head_dim: TurboQuantConfig(bits=4)),
    # The paper's MSE variant for keys: biased, but a smaller error than the unbiased one at the same bits.
    Preset("turboquant-mse-3bit", "turboquant", lambda head_dim: TurboQuantConfig(bits=3, unbiased_keys=False)),
    Preset("turboquant-mse-4bit", "turboquant", lambda head_dim: TurboQuantConfig(bits=4, unbiased_keys=False)),
]
if quanto_available():
    PRESET_LIST += [Preset("hf-quanto-2bit", "hf-quanto", lambda head_dim: QuantoConfig(bits=2)),
                    Preset("hf-quanto-4bit", "hf-quanto", lambda head_dim: QuantoConfig(bits=4))]
PRESETS = {preset.name: preset for preset in PRESET_LIST}

BUILDERS = {
    "full": lambda model, config: FullCache(model),
    "qjl": QJLCache,
    "kivi": KIVICache,
    "turboquant": TurboQuantCache,
    "hf-quanto": QuantoCache,
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown cache preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def bits_per_number(method: str, config, head_dim: int, num_layers: int | None = None) -> float:
    """Analytic bits per stored number of the quantized tokens of a method with its settings."""
    if method == "full":
        return float(FP16_BITS)
    if method == "qjl":
        return config.bits_per_fpn(head_dim, num_layers)
    return config.bits_per_number(head_dim)


def make_cache(model, spec: str):
    """A fresh cache for ``model`` from a preset name (see ``list_presets()``)."""
    preset = get_preset(spec)
    return BUILDERS[preset.method](model, preset.settings(model_head_dim(model)))


def list_presets(head_dim: int = EMBEDDED_HEAD_DIM, num_layers: int | None = None) -> dict[str, dict]:
    """Preset name -> its name, method, settings (for ``head_dim``) and analytic bits per stored number."""
    presets = {}
    for preset in PRESET_LIST:
        config = preset.settings(head_dim)
        presets[preset.name] = {"name": preset.name, "method": preset.method,
                                "settings": dataclasses.asdict(config) if config is not None else {},
                                "bits": bits_per_number(preset.method, config, head_dim, num_layers)}
    return presets
