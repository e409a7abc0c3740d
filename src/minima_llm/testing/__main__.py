"""``python -m minima_llm.testing --port N ...``: run the mock server in the foreground."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..cli import port_arg
from . import MockConfig, serve

_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("latency_s", float, "delay before each answer, seconds"),
    ("latency_jitter_s", float, "extra uniform random delay, up to this many seconds"),
    ("rpm", int, "requests per minute before 429s (0: unlimited)"),
    ("tpm", int, "tokens per minute before 429s, counted as OpenAI counts them (0: unlimited)"),
    ("tpm_burst_s", float, "seconds of the token limit that may be spent at once"),
    ("rate_limit_headers", int, "1: x-ratelimit-* and retry-after headers; 0: 429s without them"),
    ("max_concurrency", int, "in-flight requests before 503s (0: unlimited)"),
    ("failure_rate", float, "fraction of requests answered 500"),
    ("reset_rate", float, "fraction of connections reset mid-body"),
    ("malformed_rate", float, "fraction answered with invalid JSON"),
    ("seed", int, "seed for the fault and jitter draws"),
    ("model", str, "model name reported when the request names none"),
    ("stream_chunk_delay_s", float, "delay between streamed chunks, seconds"),
    ("batch_delay_s", float, "time a batch job stays in_progress before it completes, seconds"),
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every MockConfig field is an option."""
    parser = argparse.ArgumentParser(
        prog="python -m minima_llm.testing", description="OpenAI-compatible mock server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_arg, default=8000, help="0 picks a free port")
    defaults = MockConfig()
    for name, kind, help_text in _OPTIONS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, dest=name, type=kind, default=getattr(defaults, name), help=help_text
        )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = MockConfig(**{name: getattr(args, name) for name, _, _ in _OPTIONS})
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(args.host, args.port, config)
    except OSError as exc:
        parser.exit(2, f"{parser.prog}: {exc.strerror or exc}\n")


if __name__ == "__main__":
    main()
