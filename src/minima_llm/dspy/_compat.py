"""Where DSPy keeps the names this package needs, across its module layouts.

DSPy has moved ``BaseLM`` and the adapters between releases; every lookup here
tries the current path first and older ones after, so the rest of the package
imports from one place and one error names the installed version.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_EXTRA_HINT = "the DSPy integration needs dspy: pip install 'minima-llm[dspy]'"

try:
    dspy: ModuleType = importlib.import_module("dspy")
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(_EXTRA_HINT) from exc

DSPY_VERSION = str(getattr(dspy, "__version__", "unknown"))


def locate(name: str, paths: Sequence[str]) -> Any:
    """The first ``module:attribute`` in ``paths`` that imports, or None."""
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = getattr(module, attr or name, None)
        if found is not None:
            return found
    return None


def require(name: str, paths: Sequence[str]) -> Any:
    """Like :func:`locate`, but a missing name is an ``ImportError`` naming the DSPy version."""
    found = locate(name, paths)
    if found is None:
        tried = ", ".join(paths)
        raise ImportError(
            f"Could not locate DSPy {name} (dspy {DSPY_VERSION}; tried {tried}). "
            "This DSPy layout is not supported yet: pin dspy to a supported version "
            "or report the version."
        )
    return found


BaseLM: Any = require(
    "BaseLM",
    ("dspy:BaseLM", "dspy.clients.base_lm:BaseLM", "dspy.clients:BaseLM", "dspy.clients.lm:BaseLM"),
)
ChatAdapter: Any = require(
    "ChatAdapter", ("dspy:ChatAdapter", "dspy.adapters.chat_adapter:ChatAdapter")
)
AdapterParseError: Any = require(
    "AdapterParseError",
    ("dspy:AdapterParseError", "dspy.utils.exceptions:AdapterParseError"),
)
ChainOfThought: Any = require(
    "ChainOfThought", ("dspy:ChainOfThought", "dspy.predict.chain_of_thought:ChainOfThought")
)
Predict: Any = require("Predict", ("dspy:Predict", "dspy.predict.predict:Predict"))
Prediction: Any = require(
    "Prediction", ("dspy:Prediction", "dspy.primitives.prediction:Prediction")
)
# DSPy's custom field types (tools, citations, reasoning, decisions); None where DSPy has none.
DSPyType: Any = locate("Type", ("dspy:Type", "dspy.adapters.types.base_type:Type"))
# The check behind DSPy's input type-mismatch warning; the cached replay leaves to
# DSPy any input it would warn about.
input_type_fits: Callable[[Any, Any], bool] | None = locate(
    "_is_value_compatible_with_type", ("dspy.predict.predict:_is_value_compatible_with_type",)
)
# DSPy's provider error, so DSPy-aware code that catches LM errors sees ours too.
LMProviderError: Any = locate(
    "LMProviderError", ("dspy:LMProviderError", "dspy.utils.exceptions:LMProviderError")
)
History: Any = locate("History", ("dspy:History", "dspy.adapters.types.history:History"))
# DSPy's last formatting step for each message (expands custom-type markers in user turns).
expand_markers: Callable[[dict[str, Any]], dict[str, Any]] | None = locate(
    "_expand_legacy_custom_type_markers_in_chat_message",
    ("dspy.adapters._legacy_type_markers:_expand_legacy_custom_type_markers_in_chat_message",),
)
parse_value: Callable[[Any, Any], Any] | None = locate(
    "parse_value", ("dspy.adapters.utils:parse_value",)
)


def _identity(fn: Any) -> Any:
    return fn


# Without DSPy's callback decorator, LM calls simply run without callbacks.
with_callbacks: Callable[[Any], Any] = (
    locate("with_callbacks", ("dspy.utils.callback:with_callbacks",)) or _identity
)


def settings() -> Any:
    """DSPy's settings as the current task sees them."""
    return dspy.settings


def context(**overrides: Any) -> Any:
    """``dspy.context(...)``: settings for the current task only."""
    return dspy.context(**overrides)
