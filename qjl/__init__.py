"""QJL KV-cache compression for transformers 5 (Zandieh, Daliri, Han, arXiv 2406.03482)."""

from .cache import SUPPORTED_MODEL_TYPES, CompressedCache, QJLCache, QJLLayer, check_supported
from .config import PRESETS, QJLConfig
from .kivi import KIVIConfig, KIVILayer
from .layer import CompressedLayer
from .models import embedded_gguf, load_model
from .presets import FullCache, KIVICache, QuantoCache, TurboQuantCache, list_presets, make_cache
from .runner import PrefillRecord, StepRecord, encode_prompt, run_side_by_side
from .sketch import QJLSketch, pack_bits, unpack_bits
from .turboquant import TurboQuantConfig, TurboQuantLayer
from .values import dequantize_values, quantize_values

__all__ = [
    "PRESETS", "SUPPORTED_MODEL_TYPES", "CompressedCache", "CompressedLayer", "QJLCache", "QJLConfig", "QJLLayer",
    "QJLSketch", "PrefillRecord", "StepRecord", "check_supported", "encode_prompt", "run_side_by_side", "dequantize_values", "embedded_gguf", "load_model", "pack_bits",
    "quantize_values", "unpack_bits",
    "FullCache", "KIVICache", "KIVIConfig", "KIVILayer", "QuantoCache", "TurboQuantCache", "TurboQuantConfig",
    "TurboQuantLayer", "list_presets", "make_cache",
]
