"""Cache factories by name. A factory is ``lambda model: cache``.

Names come from ``qjl.list_presets()`` (``"full"`` and every compressed preset, built by ``qjl.make_cache``); the QJL
config presets (``"paper"``, ``"3bit"``: ``qjl.QJLCache(model, name)``) and ``"full"`` (transformers'
``DynamicCache``) work where the package has no preset registry.
"""

from __future__ import annotations

from typing import Callable

from transformers import DynamicCache

import qjl

FULL = "full"


def registry() -> dict:
    return qjl.list_presets() if hasattr(qjl, "list_presets") else {}


def preset_names() -> list[str]:
    """The compressed presets available (not ``"full"``)."""
    return [name for name in registry() if name != FULL] or list(qjl.PRESETS)


def factory(spec) -> Callable:
    """A cache factory for ``spec``: a preset name, ``"full"``, a ``QJLConfig``, or already a factory."""
    if isinstance(spec, qjl.QJLConfig):
        return lambda model: qjl.QJLCache(model, spec)
    if callable(spec):
        return spec
    if spec in registry():
        return lambda model: qjl.make_cache(model, spec)
    if spec == FULL:
        return lambda model: DynamicCache()
    if spec in qjl.PRESETS:
        return lambda model: qjl.QJLCache(model, spec)
    raise ValueError(f"unknown cache preset {spec!r}; known: {FULL}, {', '.join(preset_names())}")
