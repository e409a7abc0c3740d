"""Context variables: force refresh and last-cached, scoped per asyncio task."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from minima_llm import (
    get_force_refresh,
    get_last_cached,
    reset_force_refresh,
    set_force_refresh,
    set_last_cached,
)


def fresh(fn: object) -> object:
    """Run ``fn`` in an empty context, so tests never see each other's values."""
    return contextvars.Context().run(fn)  # type: ignore[arg-type]


def test_defaults_are_false() -> None:
    assert fresh(get_force_refresh) is False
    assert fresh(get_last_cached) is False


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), (False, False), (1, True), (0, False)]
)
def test_set_get_reset_force_refresh(value: object, expected: bool) -> None:
    def body() -> None:
        token = set_force_refresh(value)  # type: ignore[arg-type]
        assert get_force_refresh() is expected
        reset_force_refresh(token)
        assert get_force_refresh() is False

    fresh(body)


def test_reset_restores_the_previous_value_when_nested() -> None:
    def body() -> None:
        outer = set_force_refresh(True)
        inner = set_force_refresh(False)
        assert get_force_refresh() is False
        reset_force_refresh(inner)
        assert get_force_refresh() is True
        reset_force_refresh(outer)
        assert get_force_refresh() is False

    fresh(body)


@pytest.mark.parametrize("value", [True, False, 1, 0])
def test_set_get_last_cached(value: object) -> None:
    def body() -> None:
        set_last_cached(not value)
        set_last_cached(value)  # type: ignore[arg-type]
        assert get_last_cached() is bool(value)

    fresh(body)


async def test_task_settings_do_not_leak_to_parent() -> None:
    async def child() -> tuple[bool, bool]:
        set_force_refresh(True)
        set_last_cached(True)
        await asyncio.sleep(0)
        return get_force_refresh(), get_last_cached()

    set_force_refresh(False)
    set_last_cached(False)
    assert await asyncio.create_task(child()) == (True, True)
    assert get_force_refresh() is False
    assert get_last_cached() is False


async def test_parent_setting_is_inherited_by_tasks_created_after_it() -> None:
    token = set_force_refresh(True)
    try:
        seen = await asyncio.create_task(_read_force_refresh())
    finally:
        reset_force_refresh(token)
    assert seen is True
    assert await asyncio.create_task(_read_force_refresh()) is False


async def test_sibling_tasks_are_isolated() -> None:
    gate = asyncio.Event()

    async def worker(force: bool) -> bool:
        set_force_refresh(force)
        await gate.wait()  # both have set their value before either reads
        return get_force_refresh()

    tasks = [asyncio.create_task(worker(f)) for f in (True, False, True)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [True, False, True]


async def _read_force_refresh() -> bool:
    return get_force_refresh()
