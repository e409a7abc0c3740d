"""Console entry point ``minima-llm``: the demo, the mock server, batch jobs and cache files."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.util import find_spec
from typing import Any

from .config import MinimaLlmConfig, env_set
from .errors import MinimaLlmError


def _positive(text: str) -> int:
    """An integer of at least 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_arg(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minima-llm", description="minima-llm command line tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="run a batch against the built-in mock endpoint, then replay it from the cache"
    )
    demo.add_argument("--requests", type=_positive, default=3000, help="batch size (default 3000)")
    demo.add_argument(
        "--cache-dir", default=None, help="keep the cache here (default: a temporary directory)"
    )
    demo.add_argument(
        "--transport", choices=("auto", "stdlib", "aiohttp", "asyncio"), default="auto"
    )
    demo.add_argument(
        "--latency-ms", type=float, default=5.0, help="mock upstream latency (default 5)"
    )
    demo.add_argument(
        "--failure-rate", type=float, default=0.01, help="fraction of mock answers that are 500s"
    )

    mock = sub.add_parser("mock-server", help="serve the OpenAI-compatible mock endpoint")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=port_arg, default=8000, help="0 picks a free port")
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument(
        "--rpm", type=int, default=0, help="rate limit, answered with 429s (0 = none)"
    )
    mock.add_argument(
        "--tpm", type=int, default=0, help="token limit a minute, answered with 429s (0 = none)"
    )
    mock.add_argument(
        "--max-concurrency", type=int, default=0, help="answer 503 above this many in flight"
    )
    mock.add_argument("--failure-rate", type=float, default=0.0)
    mock.add_argument("--seed", type=int, default=0)

    status = sub.add_parser("batch-status", help="show the local provider batch jobs; cancel them")
    status.add_argument(
        "--config", "-c", help="YAML config file (default: the environment, e.g. CACHE_DIR)"
    )
    cancel = status.add_mutually_exclusive_group()
    cancel.add_argument(
        "--cancel", metavar="PREFIX", help="cancel unfinished jobs with this prefix"
    )
    cancel.add_argument(
        "--cancel-remote", metavar="BATCH_ID", help="cancel one batch at the provider by its id"
    )
    cancel.add_argument(
        "--cancel-all", action="store_true", help="cancel every unfinished job with a state file"
    )
    status.add_argument(
        "--no-refresh", action="store_true", help="show the state files without asking the provider"
    )
    cache = sub.add_parser("cache", help="what cache files hold; merge several into one")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_sub.add_parser("stats", help="rows, size, dates and models of cache files")
    stats.add_argument("paths", nargs="+", metavar="PATH", help="a cache directory or .db file")
    merge = cache_sub.add_parser(
        "merge", help="copy rows into one cache directory, the newest answer per key winning"
    )
    merge.add_argument("sources", nargs="+", metavar="SOURCE", help="cache directories or files")
    merge.add_argument(
        "--into", required=True, metavar="CACHE_DIR", help="the cache directory to merge into"
    )
    return parser


def proxy_main(argv: Sequence[str] | None = None) -> int:
    """Run ``minimallm-proxy``; without the ``[proxy]`` extra, say so in one line, not a traceback."""
    missing = [name for name in ("aiohttp", "prometheus_client") if find_spec(name) is None]
    if missing:
        print(
            f"minimallm-proxy: the gateway needs the proxy extra ({' and '.join(missing)}"
            f" {'is' if len(missing) == 1 else 'are'} not installed):"
            " pip install 'minima-llm[proxy]'",
            file=sys.stderr,
        )
        return 2
    from .proxy.cli import main as run_gateway

    return run_gateway(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``minima-llm`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous = _exit_on_sigterm()
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "batch-status":
            return _batch_status(args)
        if args.command == "cache":
            return _cache(args)
        return _mock_server(args)
    except (MinimaLlmError, ValueError, ImportError, OSError) as exc:
        # A config file that is missing or a directory: one line, as minimallm-proxy says it.
        print(f"minima-llm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minima-llm: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code == _TERMINATED:
            print("minima-llm: terminated", file=sys.stderr)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_TERMINATED = 128 + signal.SIGTERM


def _exit_on_sigterm() -> Any:
    """Make SIGTERM (what SLURM and ``kill`` send) unwind like Ctrl-C; the handler it replaces.

    Killed outright, the demo left its temporary cache directory behind; unwinding
    runs every cleanup on the way out. Only the main thread may set a handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(_TERMINATED)

    return signal.signal(signal.SIGTERM, terminate)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoAborted, DemoOptions, run_demo

    options = DemoOptions(
        requests=args.requests,
        cache_dir=args.cache_dir,
        transport=args.transport,
        latency_s=args.latency_ms / 1000.0,
        failure_rate=args.failure_rate,
    )
    try:
        results = run_demo(options, sys.stdout)
    except DemoAborted as exc:
        print(f"minima-llm: {exc}", file=sys.stderr)
        return 1
    return 0 if all(r.failures == 0 for r in results) else 1


def _mock_server(args: argparse.Namespace) -> int:
    from .testing import MockConfig, serve

    config = MockConfig(
        latency_s=args.latency_ms / 1000.0,
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrency=args.max_concurrency,
        failure_rate=args.failure_rate,
        seed=args.seed,
    )
    try:
        serve(args.host, args.port, config)
    except OSError as exc:
        # A port in use or an unknown host is one clear line, as from minimallm-proxy.
        print(f"minima-llm: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _batch_status(args: argparse.Namespace) -> int:
    from . import jobs

    config = MinimaLlmConfig.from_yaml(args.config) if args.config else _env_config()
    if args.cancel_remote and config.base_url == _NO_ENDPOINT:
        known = jobs.list_states_of(config)
        if not any(s.batch_id == args.cancel_remote for s in known):
            # No state file names its endpoint, and none is configured: say so at once
            # rather than after retrying an address that cannot resolve.
            raise MinimaLlmError(
                f"no state file names batch {args.cancel_remote}: set OPENAI_BASE_URL "
                "(or use --config) to say where to cancel it"
            )
    if args.cancel_remote:
        answer = jobs.cancel_batch(args.cancel_remote, config)
        print(f"{args.cancel_remote}: {answer.get('status')}")
        return 0
    if args.cancel or args.cancel_all:
        ids = (
            jobs.cancel_all_local_batches(config)
            if args.cancel_all
            else jobs.cancel_all_batches(config, prefix=args.cancel)
        )
        print(f"cancelled {len(ids)} batch job(s)" + "".join(f"\n  {i}" for i in ids))
        if args.cancel and not ids:
            # A prefix names its jobs exactly (cancelling "exp" must not stop "exp-2"):
            # say which longer prefixes the one given begins, should one of those be meant.
            longer = sorted(
                {
                    s.prefix
                    for s in jobs.list_states_of(config)
                    if s.prefix
                    and s.prefix != args.cancel
                    and s.prefix.startswith(args.cancel)
                    and not s.terminal
                }
            )
            if longer:
                print(
                    f"no unfinished job has the prefix {args.cancel!r} itself; unfinished jobs"
                    f" have these prefixes that begin with it: {', '.join(longer)}"
                )
    jobs.batch_status_overview(config, refresh=not args.no_refresh)
    return 0


def _env_config() -> MinimaLlmConfig:
    """The config from the environment; listing state files needs only CACHE_DIR.

    Each state file names the endpoint its job went to, so without
    ``OPENAI_BASE_URL`` (or a model) the command still shows and cancels them.
    """
    env = dict(os.environ)
    if not env_set(env, "OPENAI_BASE_URL"):
        env["OPENAI_BASE_URL"] = _NO_ENDPOINT
    if not env_set(env, "OPENAI_MODEL"):
        env["OPENAI_MODEL"] = "unset"
    return MinimaLlmConfig.from_env(env)


# Where --cancel-remote would go with no endpoint configured: an address that cannot resolve.
_NO_ENDPOINT = "http://openai-base-url-not-set.invalid/v1"


def _cache(args: argparse.Namespace) -> int:
    from .cache.maintenance import cache_stats, merge_caches

    if args.cache_command == "stats":
        status = 0
        for path in args.paths:
            try:
                print(cache_stats(path).describe(), flush=True)
            except MinimaLlmError as exc:  # the other paths are still worth showing
                print(f"minima-llm: {exc}", file=sys.stderr)
                status = 2
        return status
    report = merge_caches(args.into, args.sources, progress=print)
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
