"""litellm's OpenAI provider pointed at the gateway.

litellm is imported inside the tests: the offline fixture must set
``LITELLM_LOCAL_MODEL_COST_MAP`` before the import, or litellm fetches its price map.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from _e2e_support import API_KEY, MODEL, MockControl, Service, expected_reply, user


@pytest.fixture
def litellm() -> Iterator[Any]:
    """litellm, imported offline, with telemetry and callbacks off; its cached sync clients closed after."""
    import litellm

    litellm.telemetry = False
    litellm.callbacks = []
    litellm.success_callback = []
    litellm.failure_callback = []
    yield litellm
    # litellm keeps each provider client it builds; left open, a sync client's socket
    # is reported unclosed when the interpreter exits, long after this test.
    cached = getattr(litellm.in_memory_llm_clients_cache, "cache_dict", {})
    for client in list(cached.values()):
        close = getattr(client, "close", None)
        if callable(close) and not inspect.iscoroutinefunction(close):
            close()


@pytest.fixture
async def alitellm(litellm: Any) -> AsyncIterator[Any]:
    """litellm for async calls; closes the HTTP clients it caches on the test's event loop."""
    yield litellm
    await litellm.close_litellm_async_clients()


@pytest.fixture
def close_stray_loop() -> Iterator[None]:
    """litellm's sync API installs an event loop on the calling thread and never closes it.

    Left open, it is garbage-collected during some later test as a ResourceWarning.
    """
    yield
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        # With no loop set, this makes one (deprecated on 3.12+) or raises: both are fine.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            return
    loop.close()
    policy.set_event_loop(None)


@pytest.mark.usefixtures("close_stray_loop")
def test_completion(
    litellm: Any, gateway: Service, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("litellm sync")
    resp = litellm.completion(
        model=f"openai/{MODEL}", api_base=gateway.url, api_key=API_KEY, messages=user(prompt)
    )
    assert resp.choices[0].message.content == expected_reply(prompt)
    assert mock.requests() == 1


# litellm's own response types trip a pydantic schema warning (ReadOnly TypedDict items)
# the first time they are built; which item it names changes between litellm releases.
@pytest.mark.filterwarnings("ignore:Item '[^']*' on TypedDict class:UserWarning")
async def test_acompletion_streamed(
    alitellm: Any, gateway: Service, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("litellm streamed words")
    stream = await alitellm.acompletion(
        model=f"openai/{MODEL}",
        api_base=gateway.url,
        api_key=API_KEY,
        messages=user(prompt),
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected_reply(prompt)
    assert mock.requests() == 1
