"""Durability and sharing across real processes on a real file."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import IO

import pytest

from minima_llm.cache import SqliteStore

CHILD = str(Path(__file__).with_name("_cache_child.py"))
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )


def line_queue(stream: IO[str]) -> queue.Queue[str | None]:
    """Lines of ``stream`` as they arrive (None at EOF), so waiting on them can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_line(lines: queue.Queue[str | None], proc: subprocess.Popen[str], deadline: float) -> str:
    try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        proc.kill()
        raise AssertionError("child went quiet") from None
    if line is None:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child ended early (rc={proc.returncode}): {err}")
    return line


def expected(tag: str, i: int) -> tuple[str, str, str]:
    """(text, raw, canonical) of the child's row ``i``, recomputed independently."""
    text = f"answer {tag} {i} " + "é" * (i % 50)
    obj = {"model": "m", "messages": [{"role": "user", "content": f"{tag} {i}"}]}
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return text, json.dumps({"text": text}), canonical


def key(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_rows_survive_sigkill_of_the_writer(tmp_path: Path) -> None:
    with spawn("writer", str(tmp_path)) as proc:
        assert proc.stdout is not None
        lines = line_queue(proc.stdout)
        deadline = time.monotonic() + 20
        committed = 0
        while committed < 400:
            committed = int(next_line(lines, proc, deadline))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # Counts printed before the kill may still sit in the pipe; the last whole line counts.
        while (line := lines.get(timeout=10)) is not None:
            if line.endswith("\n"):
                committed = int(line)

    path = tmp_path / "minima_llm.db"
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT key, response_text, response_raw, model, canonical FROM cache"
            )
        }
    assert len(rows) >= committed
    for i in range(committed):
        text, raw, canonical = expected("kill", i)
        assert rows.get(key(canonical)) == (text, raw, "m", canonical), f"row {i} of {committed}"

    # The file stays usable for the next run.
    store = SqliteStore.in_dir(tmp_path)
    try:
        text, raw, canonical = expected("kill", 0)
        assert store.get_many_sync([key(canonical)])[key(canonical)].response_text == text
    finally:
        store.close()


def test_four_processes_share_one_cache(tmp_path: Path) -> None:
    n = 500
    go = tmp_path / "go"
    procs = [spawn("burst", str(tmp_path / "c"), str(i), str(n), str(go)) for i in range(4)]
    try:
        deadline = time.monotonic() + 20
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line != "ready\n":
                _, err = proc.communicate(timeout=10)
                pytest.fail(f"child did not open the cache: {line!r} {err}")
        go.touch()
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert "locked" not in err
        assert proc.returncode == 0, err
        assert out.startswith("done ")

    with closing(sqlite3.connect(tmp_path / "c" / "minima_llm.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = dict(conn.execute("SELECT key, response_text FROM cache"))
    assert len(rows) == 4 * n
    for ident in range(4):
        for i in range(n):
            text, _, canonical = expected(f"p{ident}", i)
            assert rows[key(canonical)] == text
