"""Running the mock server from sync code: a background thread, and a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import minima_llm.testing
from minima_llm.testing import MockConfig, run_mock_server_in_thread
from minima_llm.testing.__main__ import main

SRC = Path(minima_llm.testing.__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "from a thread"}]}


def post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_thread_runner_serves_sync_callers() -> None:
    with run_mock_server_in_thread(MockConfig(model="threaded")) as server:
        reply = post_json(server.url + "/chat/completions", CHAT)
        assert reply["model"] == "threaded"
        assert reply["choices"][0]["message"]["content"] == "mock reply: from a thread"
        assert server.stats()["requests"] == 1

        assert server.set_config(rpm=60).rpm == 60
        assert server.config.model == "threaded"
        assert server.fail_next(status=502) == 1
        with pytest.raises(urllib.error.HTTPError) as info:
            post_json(server.url + "/chat/completions", CHAT)
        info.value.close()
        assert info.value.code == 502

        server.reset()
        assert server.stats()["requests"] == 0
        url = server.url
    with pytest.raises(urllib.error.URLError):
        post_json(url + "/chat/completions", CHAT)
    with pytest.raises(RuntimeError):
        server.stats()


def test_thread_runner_reports_a_port_already_in_use() -> None:
    with run_mock_server_in_thread() as first:
        assert first.port is not None
        with pytest.raises(OSError):
            run_mock_server_in_thread(port=first.port)


def test_core_import_does_not_import_the_testing_subpackage() -> None:
    code = "import sys, minima_llm; print('minima_llm.testing' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == "False", result.stderr


def test_missing_aiohttp_names_the_extra_to_install() -> None:
    code = "import sys; sys.modules['aiohttp'] = None; import minima_llm.testing"
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "pip install 'minima-llm[proxy]'" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_module_entry_point_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "minima_llm.testing", "--port", "0", "--model", "cli-model"]
    with subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            prefix = "mock server listening on "
            assert line.startswith(prefix + "http://127.0.0.1:"), line
            url = line.removeprefix(prefix)
            assert url.endswith("/v1")
            assert post_json(url + "/chat/completions", CHAT)["model"] == "cli-model"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_module_entry_point_rejects_invalid_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--failure-rate", "2"])
    assert info.value.code == 2
    assert "failure_rate" in capsys.readouterr().err


def test_module_entry_point_reports_a_port_in_use_in_one_line(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--port", str(taken_port)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{taken_port}" in err
    assert "Traceback" not in err


def test_module_entry_point_refuses_a_port_above_65535(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--port", "65536"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_every_config_field_is_a_command_line_option() -> None:
    # The docstring promises it; a field added without a flag would be unreachable from the CLI.
    from minima_llm.testing.__main__ import build_parser

    parser = build_parser()
    for field in dataclasses.fields(MockConfig):
        args = parser.parse_args([f"--{field.name.replace('_', '-')}", "0"])
        assert str(getattr(args, field.name)) in ("0", "0.0"), field.name
