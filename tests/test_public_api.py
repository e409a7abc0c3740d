"""The public surface: ``__all__`` is pinned, documented names import, import stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import minima_llm

PINNED_ALL = [
    "AsyncMinimaLlmBackend",
    "BatchApiError",
    "BatchConfig",
    "CacheError",
    "ConfigError",
    "MinimaLlmConfig",
    "MinimaLlmError",
    "MinimaLlmFailure",
    "MinimaLlmRequest",
    "MinimaLlmResponse",
    "MinimaLlmResult",
    "OpenAIMinimaLlm",
    "ParasailBatchConfig",
    "StatsSnapshot",
    "TransportError",
    "Usage",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
    "get_force_refresh",
    "get_last_cached",
    "reset_force_refresh",
    "run_batched_callable",
    "set_force_refresh",
    "set_last_cached",
]

# Every name the reference documentation imports from the package.
DOCUMENTED = [
    "MinimaLlmConfig",
    "BatchConfig",
    "ParasailBatchConfig",
    "OpenAIMinimaLlm",
    "MinimaLlmRequest",
    "MinimaLlmResponse",
    "MinimaLlmFailure",
    "MinimaLlmResult",
    "AsyncMinimaLlmBackend",
    "run_batched_callable",
    "set_force_refresh",
    "get_force_refresh",
    "reset_force_refresh",
    "set_last_cached",
    "get_last_cached",
    "batch_status_overview",
    "cancel_batch",
    "cancel_all_batches",
    "cancel_all_local_batches",
]


def test_all_is_pinned_and_sorted() -> None:
    assert minima_llm.__all__ == PINNED_ALL
    assert sorted(minima_llm.__all__) == minima_llm.__all__
    assert len(set(minima_llm.__all__)) == len(minima_llm.__all__)


@pytest.mark.parametrize("name", PINNED_ALL)
def test_every_exported_name_exists(name: str) -> None:
    assert getattr(minima_llm, name) is not None


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_name_imports_from_package(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from minima_llm import {name}", namespace)
    assert namespace[name] is getattr(minima_llm, name)
    assert name in minima_llm.__all__


def test_config_error_is_a_value_error() -> None:
    assert issubclass(minima_llm.ConfigError, ValueError)
    assert issubclass(minima_llm.ConfigError, minima_llm.MinimaLlmError)
    assert issubclass(minima_llm.CacheError, minima_llm.MinimaLlmError)
    assert issubclass(minima_llm.TransportError, minima_llm.MinimaLlmError)


def test_version_is_a_string() -> None:
    assert isinstance(minima_llm.__version__, str)
    assert minima_llm.__version__


HEAVY = ["aiohttp", "yaml", "prometheus_client", "multidict", "yarl", "dspy"]


# The package, and the module paths references 000 and 001 map.
@pytest.mark.parametrize("modules", ["minima_llm", "minima_llm.protocol, minima_llm.batch"])
def test_import_does_not_load_optional_dependencies(modules: str) -> None:
    code = (
        "import json, sys\n"
        f"import {modules}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("name", ["run_dspy_batch", "MinimaLlmDSPyLM", "TolerantChatAdapter"])
def test_reference_002s_dspy_imports_work_from_the_package(name: str) -> None:
    # "from trec_auto_judge.llm import run_dspy_batch", renamed; loaded only when asked for.
    pytest.importorskip("dspy")
    from minima_llm import dspy_adapter

    namespace: dict[str, object] = {}
    exec(f"from minima_llm import {name}", namespace)
    assert namespace[name] is getattr(dspy_adapter, name)


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        minima_llm.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    ("module", "names"),
    [
        # References 000 and 001 map the package as protocol.py, batch.py, proxy.py, ...
        ("minima_llm.protocol", ["AsyncMinimaLlmBackend", "MinimaLlmRequest", "MinimaLlmResponse"]),
        ("minima_llm.protocol", ["MinimaLlmFailure", "MinimaLlmResult", "Result"]),
        ("minima_llm.batch", ["run_batched_callable", "BatchConfig", "ParasailBatchConfig"]),
        ("minima_llm.batch", ["batch_status_overview", "cancel_batch", "cancel_all_batches"]),
        ("minima_llm.batch", ["cancel_all_local_batches"]),
    ],
)
def test_the_reference_module_map_imports(module: str, names: list[str]) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module} import {', '.join(names)}", namespace)
    for name in names:
        # The same objects as the package's own, not look-alikes.
        same = minima_llm.MinimaLlmResult if name == "Result" else getattr(minima_llm, name)
        assert namespace[name] is same
