"""Records as plain dicts: the runner's dataclasses, or dicts already (from JSON, from the app's state)."""

from __future__ import annotations

import dataclasses


def as_dict(record) -> dict:
    if record is None or isinstance(record, dict):
        return record
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    raise TypeError(f"expected a record (dataclass or dict), got {type(record).__name__}")


def as_dicts(records) -> list[dict]:
    return [as_dict(r) for r in records]
