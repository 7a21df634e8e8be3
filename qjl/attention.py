"""The ``qjl`` attention function registered with transformers.

Keys that a compressed layer tagged (see ``qjl.layer``) are scored against that layer's compressed state; any other
keys (a full-precision cache, a prefill) go to transformers' own SDPA attention, so one model with the ``qjl``
implementation serves compressed and full caches side by side.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .layer import LAYER_ATTRIBUTE

ATTENTION_NAME = "qjl"


def qjl_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scaling), None


def install(model) -> None:
    """Registers the ``qjl`` attention and mask functions and switches ``model`` to them (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, qjl_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
