"""Cache factories by name: ``"full"`` (transformers' ``DynamicCache``) and every compressed preset.

Compressed presets come from ``qjl.make_cache`` / ``qjl.list_presets`` where the package has them, else from the QJL
presets (``qjl.QJLCache(model, name)``). A factory is ``lambda model: cache``.
"""

from __future__ import annotations

from typing import Callable

from transformers import DynamicCache

import qjl

FULL = "full"


def preset_names() -> list[str]:
    """The compressed presets available."""
    if hasattr(qjl, "list_presets"):
        return list(qjl.list_presets())
    return list(qjl.PRESETS)


def factory(spec) -> Callable:
    """A cache factory for ``spec``: a preset name, ``"full"``, a ``QJLConfig``, or already a factory."""
    if callable(spec) and not isinstance(spec, (str, qjl.QJLConfig)):
        return spec
    if spec == FULL:
        return lambda model: DynamicCache()
    if isinstance(spec, qjl.QJLConfig):
        return lambda model: qjl.QJLCache(model, spec)
    if spec not in preset_names():
        raise ValueError(f"unknown cache preset {spec!r}; known: {FULL}, {', '.join(preset_names())}")
    if hasattr(qjl, "make_cache"):
        return lambda model: qjl.make_cache(model, spec)
    return lambda model: qjl.QJLCache(model, spec)
