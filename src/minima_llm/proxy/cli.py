"""``minimallm-proxy``: run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ..backend import OpenAIMinimaLlm
from ..config import MinimaLlmConfig, ParasailBatchConfig, read_yaml
from ..errors import MinimaLlmError
from ..gcpolicy import raise_for_process
from .app import build_app
from .gateway import Gateway
from .handlers import GATEWAY
from .log import LineFormatter
from .settings import DEFAULT_PORT, ProxySettings

GATEWAY_MEMORY_ENTRIES = 10_000
# What ``transport: auto`` means here: a gateway spends most of its CPU relaying to
# the upstream, and this transport costs a third of aiohttp's client per request
# (docs/performance.md).
GATEWAY_TRANSPORT = "asyncio"
# aiohttp waits this much longer than the gateway's own deadline, so the deadline (which
# stops the requests that overstay) is what ends a shutdown, not aiohttp's two waits.
_SHUTDOWN_SLACK_S = 2.0
log = logging.getLogger("minima_llm.proxy")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minimallm-proxy",
        description="OpenAI-compatible gateway with minima-llm's prompt cache, pacing and retries.",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"listen port (default {DEFAULT_PORT})")
    p.add_argument(
        "--config", "-c", default=None, help="YAML config file (default: environment variables)"
    )
    p.add_argument(
        "--force-model",
        action="store_true",
        help="ignore the client's model, use the configured one",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log a line for every request")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow listening beyond loopback without API keys",
    )
    return p


def load(args: argparse.Namespace) -> tuple[MinimaLlmConfig, ProxySettings]:
    """Upstream config and gateway settings from the YAML file or the environment, then the flags."""
    section: dict[str, Any] = {}
    if args.config:
        config = MinimaLlmConfig.from_yaml(args.config)
        proxy = read_yaml(args.config).get("proxy") or {}
        if not isinstance(proxy, dict):
            raise MinimaLlmError(f"{args.config}: 'proxy' must be a mapping")
        section.update(proxy)
    else:
        config = MinimaLlmConfig.from_env()
    if config.parasail.enabled:
        # Its apps wait on each answer: a provider job takes minutes to hours, so the
        # gateway answers live and leaves batch mode to run_batched (one config file may
        # serve both).
        log.warning(
            "parasail.llm_batch_prefix is set: the gateway answers live all the same "
            "(batch mode is for run_batched)"
        )
        config = config.replace(parasail=ParasailBatchConfig())
    if config.memory_cache_entries == 0 and "MEMORY_CACHE_ENTRIES" not in os.environ:
        # A long-running gateway answers the same questions again and again: keep
        # recent answers in memory unless told otherwise.
        config = config.replace(memory_cache_entries=GATEWAY_MEMORY_ENTRIES)
    if config.transport == "auto":
        config = config.replace(transport=GATEWAY_TRANSPORT)
    section.update(ProxySettings.env_overrides())
    for flag in ("host", "port"):
        if getattr(args, flag) is not None:
            section[flag] = getattr(args, flag)
    for flag in ("force_model", "verbose", "allow_unauthenticated"):
        if getattr(args, flag):
            section[flag] = True
    settings = ProxySettings.from_mapping(section)
    settings.check_exposure()
    return config, settings


def _lean_log_records() -> None:
    """Skip what log records collect and the gateway's format never shows.

    The gateway writes a line per upstream call; the logging HOWTO's
    "Optimization" section names these switches. The caller lookup alone walks
    the stack for every record. This process is the gateway's own, so changing
    them here touches no one else's logging.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets on every address of ``host`` (port 0: one free port for all).

    ``localhost`` usually means both ::1 and 127.0.0.1; clients may try either.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    family, address = addresses[0]
    first = socket.create_server(address, family=family, backlog=1024)
    sockets = [first]
    chosen = first.getsockname()[1]
    try:
        for family, address in addresses[1:]:
            try:
                sockets.append(
                    socket.create_server((address[0], chosen), family=family, backlog=1024)
                )
            except OSError as exc:
                # A family the machine has not enabled (no IPv6) is no reason not to serve.
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _drain(gateway: Gateway, timeout_s: float) -> None:
    """Stop the requests still running ``timeout_s`` after a shutdown began, or at a second signal.

    aiohttp alone would wait ``timeout`` for a handler, then as long again after asking
    it to stop, which a stream writing to its client never notices; and its handler
    for a second SIGINT/SIGTERM breaks the cleanup with tracebacks and exit status 1.
    """
    loop = asyncio.get_running_loop()
    running = sum(not task.done() for task in gateway.answering)
    log.info(
        "shutting down: no new connections; %d request(s) in flight get up to %gs",
        running,
        timeout_s,
    )
    loop.call_later(timeout_s, _cut_off, gateway, f"still running after {timeout_s:g}s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, _cut_off, gateway, "second signal")
        except NotImplementedError:  # Windows' loops: the deadline alone ends the shutdown
            break


def _cut_off(gateway: Gateway, why: str) -> None:
    stopped = gateway.cut_off(why)
    if stopped:
        log.warning("shutting down: stopped %d request(s) %s", stopped, why)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``minimallm-proxy`` until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    _lean_log_records()
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        config, settings = load(args)
    except (MinimaLlmError, ValueError, OSError, ImportError) as exc:
        print(f"minimallm-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        # Bound here rather than by run_app: a port in use is one clear line, not a
        # traceback, and with --port 0 the address printed is the one really bound.
        sockets = listen(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"minimallm-proxy: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        backend = OpenAIMinimaLlm(config)
    except (MinimaLlmError, ValueError, OSError, ImportError) as exc:
        for sock in sockets:
            sock.close()
        print(f"minimallm-proxy: {exc}", file=sys.stderr)
        return 2
    app = build_app(backend, settings)
    port = sockets[0].getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    cache = config.cache_path or "off (set CACHE_DIR)"
    auth = f"{len(settings.api_keys)} API key(s)" if settings.auth_enabled else "no auth"
    if settings.cors_origins:
        auth += f"; browsers from {', '.join(settings.cors_origins)}"
    via = f" via proxy {backend.proxy}" if backend.proxy else ""

    def announce(_: str) -> None:
        print(
            f"minimallm-proxy listening on http://{host}:{port}/v1\n"
            f"  upstream {config.base_url} model {config.model}{' (forced)' if settings.force_model else ''}"
            f" over {config.transport}{via}\n"
            f"  cache    {cache}\n  auth     {auth}",
            flush=True,
        )

    # run_app stops on SIGINT/SIGTERM: it stops accepting, lets requests in flight
    # finish, then cleanup closes the backend (committing what is queued).
    app.on_shutdown.append(lambda app: _drain(app[GATEWAY], settings.shutdown_timeout_s))
    # Everything made so far (modules, the app) lives as long as the process: frozen, the
    # collector's full passes skip it, so they cost a fraction of the time (and of p99).
    gc.collect()
    gc.freeze()
    raise_for_process()
    web.run_app(
        app,
        sock=sockets,
        shutdown_timeout=settings.shutdown_timeout_s + _SHUTDOWN_SLACK_S,
        access_log=None,
        print=announce,
        handle_signals=True,
        loop=asyncio.new_event_loop(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
