"""Cache factories by name. A factory is ``lambda model: cache``; names are those of ``qjl.list_presets()``."""

from __future__ import annotations

from typing import Callable

import qjl

FULL = "full"


def preset_names() -> list[str]:
    """The compressed presets available (not ``"full"``)."""
    return [name for name in qjl.list_presets() if name != FULL]


def factory(spec) -> Callable:
    """A cache factory for ``spec``: a preset name (``"full"`` included), a ``QJLConfig``, or already a factory."""
    if isinstance(spec, qjl.QJLConfig):
        return lambda model: qjl.QJLCache(model, spec)
    if callable(spec):
        return spec
    qjl.presets.get_preset(spec)  # an unknown name fails here, listing the known ones
    return lambda model: qjl.make_cache(model, spec)
