"""The ``minima-llm`` command: the demo end to end, and argument errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        # A batch needs at least one request.
        *(("demo", "--requests", count) for count in ("0", "-5", "many")),
        # A TCP port is 0 (any free one) to 65535.
        *(("mock-server", "--port", port) for port in ("-1", "65536", "http")),
    ],
)
def test_out_of_range_values_are_usage_errors_naming_the_flag(
    command: str, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_mock_server_reports_a_port_in_use_in_one_line(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mock-server", "--port", str(taken_port)]) == 2
    err = capsys.readouterr().err
    assert f"minima-llm: cannot listen on 127.0.0.1:{taken_port}" in err
    assert "Traceback" not in err


def test_demo_stopped_by_too_many_failures_exits_1_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["demo", "--requests", "30", "--latency-ms", "0", "--failure-rate", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "minima-llm: Aborting batch: 26 failures (max_failures=25)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["missing.yaml", "."])
def test_batch_status_with_a_config_it_cannot_read_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    assert main(["batch-status", "--config", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minima-llm: ") and len(err.strip().splitlines()) == 1


def test_the_demo_leaves_no_temporary_directory(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args, code in ((["--failure-rate", "2"], 2), (["--requests", "20", "--cache-dir", ""], 0)):
        proc = subprocess.run(
            [sys.executable, "-m", "minima_llm.cli", "demo", *args],
            capture_output=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == code, proc.stderr
        assert list(tmp_path.iterdir()) == [], args


@pytest.mark.parametrize(
    ("sig", "code", "said"), [("TERM", 143, "terminated"), ("INT", 130, "interrupted")]
)
def test_a_demo_stopped_by_a_signal_cleans_up_and_says_so(
    tmp_path: Path, sig: str, code: int, said: str
) -> None:
    # SLURM sends SIGTERM before it kills a job; the demo used to die at once and leave
    # its temporary cache directory behind.
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "minima_llm.cli", "demo", "--requests", "50000"]
    cmd += ["--latency-ms", "50"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # the demo has started
            deadline = time.monotonic() + 30
            while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            proc.send_signal(getattr(signal, f"SIG{sig}"))
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == code, err
    assert f"minima-llm: {said}" in err.decode() and b"Traceback" not in err
    # SystemExit raised inside one of aiohttp's tasks used to be printed as a task
    # exception never retrieved, with a coroutine never awaited beside it.
    assert b"never retrieved" not in err and b"never awaited" not in err, err
    assert list(tmp_path.iterdir()) == []


README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_shows_the_mock_server_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # It showed 50 ms, 1200 rpm and 5% failures where the command adds none.
    line = next(x for x in README.splitlines() if x.startswith("- `minima-llm mock-server"))
    shown = dict(re.findall(r"\[--([\w-]+) ([^]]+)\]", line))
    started: dict[str, Any] = {}
    monkeypatch.setattr(
        "minima_llm.testing.serve",
        lambda host, port, config: started.update(host=host, port=port, config=config),
    )
    assert main(["mock-server"]) == 0
    config = started["config"]
    assert shown == {
        "host": started["host"],
        "port": str(started["port"]),
        "latency-ms": f"{config.latency_s * 1000:g}",
        "rpm": str(config.rpm),
        "tpm": str(config.tpm),
        "max-concurrency": str(config.max_concurrency),
        "failure-rate": f"{config.failure_rate:g}",
        "seed": str(config.seed),
    }


def test_the_gateway_command_on_a_core_install_says_what_to_install(tmp_path: Path) -> None:
    # -S hides site-packages: the core install, where aiohttp is not there to import.
    src = Path(__file__).resolve().parent.parent / "src"
    code = (
        f"import sys; sys.path.insert(0, {str(src)!r})\n"
        "from minima_llm.cli import proxy_main\n"
        "sys.exit(proxy_main(['--port', '0']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("minimallm-proxy: the gateway needs the proxy extra (aiohttp")
    assert "pip install 'minima-llm[proxy]'" in proc.stderr
