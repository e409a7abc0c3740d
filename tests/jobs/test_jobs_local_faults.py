"""Batch mode's local side under real conditions: shared directories, PID namespaces, big jobs.

A lab shares one state directory (several users, a group, umask 002); containers
share a hostname but not their PIDs; the generate path sends many long prompts at
once. Real files, real processes (forked as other users, or in a new PID namespace
by ``unshare``) and real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jobs_support import (
    FILES,
    Factory,
    Proxy,
    assert_split_by_bytes,
    config,
    parasail,
    questions,
    quietly,
    replies,
    texts,
)

import minima_llm
from fork_support import ALLOW_FORK, in_forked_child
from minima_llm import OpenAIMinimaLlm, run_batched_callable
from minima_llm.jobs import BatchApiError, JobState
from minima_llm.jobs import lock as lock_module
from minima_llm.jobs.lock import held, lock_path, pid_is_comparable
from minima_llm.jobs.state import digest_of, list_states, path_for
from minima_llm.testing import MockServer, run_mock_server_in_thread

ALICE, BOB, LAB = 1001, 1002, 2000  # two lab members and their group
NS_FILE = Path("/proc/self/ns/pid")
HOST = socket.gethostname()
CHAT = "/v1/chat/completions"


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- 1. files a lab sharing a state directory can read and replace ---------------------------


@ALLOW_FORK
@pytest.mark.parametrize(
    ("umask", "mode"),
    [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)],
    ids=["umask-002", "umask-022", "umask-077"],
)
def test_state_and_lock_files_get_the_mode_the_umask_gives(
    tmp_path: Path, umask: int, mode: int
) -> None:
    # mkstemp made every state file 0600, whatever the umask.
    digest = digest_of(CHAT, "m", ["a"])
    state = JobState("p", digest, CHAT, "http://127.0.0.1:1/v1", "m", 1)
    state.path = path_for(tmp_path, "p", digest)

    def write() -> list[int]:
        state.save()
        first = mode_of(state.path)  # type: ignore[arg-type]
        state.update({"status": "in_progress"})
        state.save()  # a new file replaces the old one: the mode must hold for it too
        with held(lock_path(tmp_path)):
            return [first, mode_of(state.path), mode_of(lock_path(tmp_path))]  # type: ignore[arg-type]

    assert in_forked_child(write, timeout=60, umask=umask) == [mode, mode, mode]
    assert [p.name for p in tmp_path.iterdir()] == [state.path.name]


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A directory as a lab sets one up: group LAB, setgid and group-writable ``state``.

    Not pytest's tmp_path, which is private to its owner.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two other users")
    base = Path(tempfile.mkdtemp(prefix="minima-lab-"))
    base.chmod(0o755)
    state = base / "state"
    state.mkdir()
    os.chown(state, -1, LAB)
    state.chmod(0o2775)
    for uid in (ALICE, BOB):
        (base / str(uid)).mkdir()
        os.chown(base / str(uid), uid, LAB)  # each member's own cache
    try:
        yield base
    finally:
        shutil.rmtree(base)


@ALLOW_FORK
def test_lab_members_sharing_a_state_directory_take_over_each_other_s_jobs(
    lab_dir: Path,
) -> None:
    # Bob found Alice's 0600 state file unreadable and got a BatchStateError for every
    # request, though the README says several people can share one state directory.
    state_dir = lab_dir / "state"
    with run_mock_server_in_thread() as mock:

        def run(numbers: range, cache_dir: Path, states: Path = state_dir) -> list[str]:
            cfg = config(
                mock.url,
                cache_dir,
                api_key="sk-lab",  # the lab's key: its jobs are every member's
                parasail=parasail(state_dir=str(states)),
            )

            async def batch() -> list[str]:
                backend = OpenAIMinimaLlm(cfg)
                try:
                    results = await asyncio.wait_for(
                        backend.run_batched(questions(*numbers), progress=False), 20
                    )
                finally:
                    await backend.aclose()
                return [getattr(r, "text", None) or repr(r) for r in results]

            return asyncio.run(batch())

        # As root, first: the children then import nothing from root's private home.
        warm_up = lab_dir / "warm-up"
        assert run(range(1), warm_up, warm_up) == replies(range(1))
        shutil.rmtree(warm_up)
        mock.reset()

        def member(uid: int, n: int, state: Path) -> Any:
            """``run`` as lab member ``uid``, with the umask a shared directory wants."""
            return in_forked_child(lambda: run(range(n), state), uid, 60, gid=LAB, umask=0o002)

        alice = member(ALICE, 3, lab_dir / str(ALICE))
        bob = member(BOB, 5, lab_dir / str(BOB))
        again = member(ALICE, 5, lab_dir / str(ALICE))

        assert (alice, bob, again) == (replies(range(3)), replies(range(5)), replies(range(5)))
        assert mock.stats()["batch_lines"] == 5  # Bob took Alice's three, Alice Bob's two
    files = sorted(state_dir.glob("*.batch.json"))
    assert len(files) == 2
    assert {(mode_of(f), f.stat().st_gid) for f in files} == {(0o664, LAB)}
    assert all(len(s.delivered) == s.request_count for s in list_states(state_dir))


# --- 2. a lock held in another PID namespace -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "namespace", "comparable"),
    [
        ("node 12 tok 111", "111", True),
        ("node 12 tok 222", "111", False),  # another container with our hostname
        ("elsewhere 12 tok 111", "111", False),
        ("node 12 tok", "111", True),  # written before namespaces were recorded: as then
        ("node 12 tok -", "-", True),  # a platform without PID namespaces
        ("node 12 tok ?", "?", False),  # neither side could read its namespace
        ("node 12 tok 111", "?", False),
        ("node x tok 111", "111", False),
        ("node 12 tok 111 more", "111", False),
        ("", "111", False),
    ],
)
def test_whether_a_lock_s_pid_can_be_asked_about(
    text: str, namespace: str, comparable: bool
) -> None:
    assert pid_is_comparable(text.split(), "node", namespace) is comparable


def our_namespace() -> str:
    try:
        return str(NS_FILE.stat().st_ino)
    except OSError:
        pytest.skip(f"{NS_FILE} is not readable here")


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_lock_names_its_holder_s_pid_namespace(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    with held(path):
        host, pid, _token, namespace = path.read_text().split()
    assert (host, pid, namespace) == (HOST, str(os.getpid()), our_namespace())


def test_a_dead_pid_in_our_pid_namespace_is_broken_at_once(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    path.write_text(f"{HOST} {dead_pid()} gone {our_namespace()}\n")
    started = time.monotonic()
    with held(path, wait_s=1.0):
        assert f" {os.getpid()} " in path.read_text()
    assert time.monotonic() - started < 0.5


def test_a_lock_from_another_pid_namespace_is_broken_only_once_stale(tmp_path: Path) -> None:
    # Its pid is no process here, but may well be a live one there.
    path = lock_path(tmp_path)
    foreign = f"{HOST} {dead_pid()} theirs 1{our_namespace()}\n"
    path.write_text(foreign)
    with pytest.raises(BatchApiError, match=f"locked by {HOST} pid"), held(path, wait_s=0.2):
        pass
    assert path.read_text() == foreign
    age(path, 2 * lock_module.STALE_S)
    with held(path, wait_s=0.2):
        assert f" {os.getpid()} " in path.read_text()


def unshared() -> list[str]:
    """The command prefix that runs a program in a new PID namespace, or skip saying why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here to make a PID namespace")
    command = [unshare, "--pid", "--fork"]
    probe = subprocess.run([*command, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    return command


def child_env() -> dict[str, str]:
    src = str(Path(minima_llm.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


TAKE_ONCE = """
import os, sys
from pathlib import Path
from minima_llm.jobs import BatchApiError
from minima_llm.jobs.lock import held
print(os.stat("/proc/self/ns/pid").st_ino)
try:
    with held(Path(sys.argv[1]), wait_s=0.5):
        print("took")
except BatchApiError:
    print("waited")
"""


def test_a_live_holder_in_another_pid_namespace_is_waited_for(tmp_path: Path) -> None:
    # In a new PID namespace our pid is no process, so the lock used to be broken at once.
    command = unshared()
    path = lock_path(tmp_path)
    with held(path):
        mine = path.read_text()
        child = subprocess.run(
            [*command, sys.executable, "-c", TAKE_ONCE, str(path)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=30,
            check=True,
        )
        namespace, outcome = child.stdout.split()
        assert namespace != our_namespace()
        assert outcome == "waited", child.stderr
        assert path.read_text() == mine
    assert not path.exists()


BATCH_RUN = """
import asyncio, json, sys
from minima_llm import (BatchConfig, MinimaLlmConfig, MinimaLlmRequest, OpenAIMinimaLlm,
                        ParasailBatchConfig)
url, cache_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = MinimaLlmConfig(base_url=url, model="mock-model", cache_dir=cache_dir, timeout_s=20,
                      batch=BatchConfig(heartbeat_s=0, stall_s=0),
                      parasail=ParasailBatchConfig(llm_batch_prefix="p", poll_interval_s=0.05))
async def main():
    backend = OpenAIMinimaLlm(cfg)
    requests = [MinimaLlmRequest(f"q{n}-{n}", [{"role": "user", "content": f"question {n}"}])
                for n in range(count)]
    try:
        results = await backend.run_batched(requests, progress=False)
    finally:
        await backend.aclose()
    print(json.dumps([getattr(r, "text", None) or repr(r) for r in results]))
asyncio.run(main())
"""


async def test_a_run_in_another_pid_namespace_takes_over_instead_of_sending_again(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    # Two containers with one hostname on one state directory: the second broke the
    # first one's live lock during its upload and paid for the same requests again.
    command = unshared()
    uploading = asyncio.Event()

    async def slow_first_upload(request: web.Request, body: bytes) -> None:
        if (request.method, request.path) == ("POST", FILES) and not uploading.is_set():
            uploading.set()
            await asyncio.sleep(1.5)

    proxy.fault = slow_first_upload
    first = asyncio.ensure_future(quietly(make(base_url=proxy.url), questions(*range(5))))
    await asyncio.wait_for(uploading.wait(), 5)
    child = await asyncio.create_subprocess_exec(
        *command,
        sys.executable,
        "-c",
        BATCH_RUN,
        proxy.url,
        str(tmp_path / "cache"),
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        (out, err), ours = await asyncio.wait_for(asyncio.gather(child.communicate(), first), 30)
    finally:
        if child.returncode is None:  # timed out: leave no process behind
            child.kill()
            await child.wait()

    assert child.returncode == 0, err.decode()
    assert json.loads(out) == replies(range(5)) == texts(ours)
    assert proxy.count("POST", FILES) == 1
    assert mock.stats()["batch_lines"] == 5


# --- 3. the generate path's jobs within the provider's byte limit ----------------------------


async def test_generate_in_batch_mode_splits_a_job_by_bytes(make: Factory, tmp_path: Path) -> None:
    # The collector counted lines only: one job of 1040 bytes went to a provider taking 700.
    backend = make()
    jobs = backend.jobs
    assert jobs is not None
    jobs.max_bytes = 700

    results = await asyncio.wait_for(
        run_batched_callable(
            questions(*range(5)), backend.generate, backend.cfg.batch, progress=False
        ),
        20,
    )

    assert texts(results) == replies(range(5))
    await assert_split_by_bytes(tmp_path / "cache", jobs, 5)
