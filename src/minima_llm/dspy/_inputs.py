"""Reading a signature's input fields off the objects a batch is given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def input_values(obj: Any, names: Sequence[str]) -> dict[str, Any]:
    """The signature's input fields taken from ``obj`` by name."""
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump(include=set(names)))
    if isinstance(obj, Mapping):
        return {name: obj[name] for name in names if name in obj}
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}
