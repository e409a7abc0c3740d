"""DSPy's ``dspy.LM`` (litellm underneath) pointed at the gateway.

A full ``dspy.Predict`` round trip needs the mock to answer in DSPy's field
format; only raw LM calls are covered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from _e2e_support import API_KEY, MODEL, MockControl, Service, expected_reply, user


@pytest.fixture
def lm(gateway: Service) -> Any:
    """A DSPy LM on the gateway, with DSPy's own cache off so every call reaches it."""
    import dspy  # after the offline fixture has pointed DSPY_CACHEDIR at a temp dir

    return dspy.LM(f"openai/{MODEL}", api_base=gateway.url, api_key=API_KEY, cache=False)


# DSPy 3.4 deprecates messages= (removal planned for 3.5); it is still how most code calls it.
@pytest.mark.filterwarnings("ignore:Passing OpenAI-style message dictionaries:DeprecationWarning")
def test_raw_lm_messages_call_and_gateway_cache(
    lm: Any, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("dspy raw call")
    assert lm(messages=user(prompt)) == [expected_reply(prompt)]
    assert lm(messages=user(prompt)) == [expected_reply(prompt)]
    assert mock.requests() == 1  # the repeat was the gateway's cache hit


def test_raw_lm_prompt_call(lm: Any, mock: MockControl, unique: Callable[[str], str]) -> None:
    prompt = unique("dspy prompt call")
    assert lm(prompt) == [expected_reply(prompt)]
    assert mock.requests() == 1
