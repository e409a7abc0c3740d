"""LangChain's ``ChatOpenAI`` pointed at the gateway."""

from __future__ import annotations

from collections.abc import Callable

from _e2e_support import API_KEY, MODEL, MockControl, Service, expected_reply
from langchain_openai import ChatOpenAI


def test_invoke_stream_and_cached_invoke(
    gateway: Service, mock: MockControl, unique: Callable[[str], str]
) -> None:
    llm = ChatOpenAI(base_url=gateway.url, api_key=API_KEY, model=MODEL, max_retries=0)
    prompt = unique("tell me something")
    answer = llm.invoke(prompt)
    assert answer.content == expected_reply(prompt)
    assert mock.requests() == 1
    streamed = "".join(str(chunk.content) for chunk in llm.stream(prompt))
    assert streamed == answer.content
    again = llm.invoke(prompt)
    assert again.content == answer.content
    assert mock.requests() == 1  # the stream and the second invoke came from the cache
