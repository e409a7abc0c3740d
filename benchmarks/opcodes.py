"""Python bytecodes per request, by function: a profile the machine's noise cannot move.

``python -m benchmarks.opcodes [--requests N] [--top K] [SIDE ...]`` runs each side
(``bare``: the reference aiohttp client; ``client``: ``run_batched`` with the SQLite
cache; ``nocache``: the same without a cache; ``gateway``: the gateway answering cache
misses from a load generator in a child process, at concurrency 64; ``relay``: the bare
aiohttp relay of ``benchmarks._relay`` under the same load) against a mock in another
process, with a trace function counting every bytecode the event loop's
thread executes during the timed batch. It prints the total per request and the functions that
execute most, so a change to the hot path can be judged in seconds: two runs of
the same code agree to within 0.1%. Callgrind (``benchmarks.instructions``) counts
machine instructions instead, C code included; neither counts the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from minima_llm import OpenAIMinimaLlm

from ._clients import backend_config, bare_aiohttp, make_requests, payloads_of, quiet
from ._mock import MockProcess

SIDES = ("bare", "client", "nocache", "gateway", "relay")
# The gateway side's load generator: warms up, waits for a line on stdin, then sends.
_LOAD = """
import sys
from benchmarks._loadgen import payloads, run
url, count = sys.argv[1], int(sys.argv[2])
run(url, payloads(256), 64, 60.0)
print("warm", flush=True)
sys.stdin.readline()
print("errors", run(url, payloads(count), 64, 60.0).errors, flush=True)
"""
WARMUP = 256
Tracer = Callable[[FrameType, str, Any], Any]


def _counter(counts: collections.Counter[str]) -> Tracer:
    """A ``sys.settrace`` function adding one to a function's count per bytecode."""

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        name = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:{code.co_name}"

        def opcode(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[name] += 1
            return opcode

        return opcode

    return trace


@contextlib.contextmanager
def _tracing(counts: collections.Counter[str]) -> Iterator[None]:
    """Count the bytecodes this thread runs inside the block."""
    sys.settrace(_counter(counts))
    try:
        yield
    finally:
        sys.settrace(None)


async def _server(kind: str, url: str, count: int, counts: collections.Counter[str]) -> None:
    """The gateway or the relay in this process, its load from a child, so only it is counted."""
    from aiohttp import web

    from minima_llm.proxy import build_app
    from minima_llm.proxy.cli import GATEWAY_TRANSPORT

    from ._relay import make_app

    with tempfile.TemporaryDirectory(prefix="minima-opcodes-") as cache_dir:
        config = backend_config(url, cache_dir, GATEWAY_TRANSPORT)
        app = build_app(OpenAIMinimaLlm(config)) if kind == "gateway" else make_app(url)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            load = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _LOAD,
                f"http://127.0.0.1:{port}/v1",
                str(count),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert load.stdin is not None and load.stdout is not None
            await asyncio.wait_for(load.stdout.readline(), 60.0)
            with _tracing(counts):
                load.stdin.write(b"go\n")
                await load.stdin.drain()
                done = await asyncio.wait_for(load.stdout.readline(), 120.0)
            await load.wait()
            if done.split() != [b"errors", b"0"]:
                raise RuntimeError(f"the load generator saw errors: {done!r}")
        finally:
            await runner.cleanup()


async def _side(kind: str, url: str, count: int, counts: collections.Counter[str]) -> None:
    if kind in ("gateway", "relay"):
        await _server(kind, url, count, counts)
        return
    requests = make_requests(count, f"op-{kind}")
    warmup = make_requests(WARMUP, f"op-{kind}-warm")
    if kind == "bare":
        around = functools.partial(_tracing, counts)
        await bare_aiohttp(url, payloads_of(requests), payloads_of(warmup), around)
        return
    with tempfile.TemporaryDirectory(prefix="minima-opcodes-") as cache_dir:
        config = backend_config(url, None if kind == "nocache" else cache_dir, "aiohttp")
        backend = OpenAIMinimaLlm(config)
        try:
            with quiet():
                await backend.run_batched(warmup)
                with _tracing(counts):
                    await backend.run_batched(requests)
        finally:
            await backend.aclose()


def main(argv: list[str] | None = None) -> None:
    """Count and print each side's bytecodes per request."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.opcodes")
    parser.add_argument(
        "sides", nargs="*", metavar="SIDE", help=f"{', '.join(SIDES)} (default: all)"
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25, help="functions listed per side")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown side {', '.join(unknown)}: choose from {', '.join(SIDES)}")
    with MockProcess() as mock:
        for kind in args.sides or SIDES:
            counts: collections.Counter[str] = collections.Counter()
            asyncio.run(_side(kind, mock.url, args.requests, counts))
            total = sum(counts.values()) / args.requests
            print(f"{kind:<10} {total:8,.0f} bytecodes/request")
            for name, n in counts.most_common(args.top):
                print(f"    {n / args.requests:8.1f}  {name}")


if __name__ == "__main__":
    main()
