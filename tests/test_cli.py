"""The ``minima-llm`` command: the demo end to end, and argument errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minima_llm.cli import main


def test_demo_runs_cold_then_replays_from_cache(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "minima_llm.cli",
            "demo",
            "--requests",
            "300",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split()[0] + " " + line.split()[1]: line.split()
        for line in proc.stdout.splitlines()
        if line.startswith(("cold run", "cached replay"))
    }
    cold, warm = rows["cold run"], rows["cached replay"]
    # columns: pass(2 words) requests live hits failed upstream wall req/s
    assert cold[2:6] == ["300", "300", "0", "0"]
    assert int(cold[6]) >= 300  # injected 500s were retried
    assert warm[2:7] == ["300", "0", "300", "0", "0"]  # replay: zero upstream calls
    assert (tmp_path / "minima_llm.db").exists()


def test_bad_arguments_exit_with_usage(capsys: object) -> None:
    try:
        main(["demo", "--transport", "curl"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse should have rejected --transport curl")


@pytest.mark.parametrize("count", ["0", "-5", "many"])
def test_demo_refuses_a_batch_size_below_one(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--requests", count])
    assert exc.value.code == 2
    assert "--requests" in capsys.readouterr().err


def test_mock_server_reports_a_port_in_use_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["mock-server", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"minima-llm: cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_mock_server_refuses_a_port_outside_0_to_65535(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["mock-server", "--port", port])
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_demo_stopped_by_too_many_failures_exits_1_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["demo", "--requests", "30", "--latency-ms", "0", "--failure-rate", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "minima-llm: Aborting batch: 26 failures (max_failures=25)" in err
    assert "Traceback" not in err
