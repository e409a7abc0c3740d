"""Where batch progress goes: a logger, a stream, or a single live line on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

log = logging.getLogger("minima_llm.batch")

ProgressTarget = logging.Logger | TextIO | bool | None


class ProgressSink:
    """Writes status lines and reports; on a terminal the status is one line redrawn in place."""

    def __init__(self, target: ProgressTarget = None) -> None:
        self.logger: logging.Logger | None = None
        self.stream: TextIO | None = None
        if target is False:
            pass
        elif isinstance(target, logging.Logger):
            self.logger = target
        elif target is None or target is True:
            self.stream = sys.stderr
        else:
            self.stream = target
        self.live = bool(self.stream is not None and _isatty(self.stream))
        self._line_open = False

    def status(self, line: str) -> None:
        """A progress line (redrawn in place on a terminal)."""
        if self.logger is not None:
            self.logger.info(line)
        elif self.stream is not None:
            if self.live:
                self.stream.write("\r\x1b[2K" + line)
                self._line_open = True
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def report(self, text: str, level: int = logging.INFO) -> None:
        """A message that stays: failures, warnings, the summary."""
        if self.logger is not None:
            self.logger.log(level, text)
        elif self.stream is not None:
            if self._line_open:
                # Replace the live status line rather than leave a stale copy above the report.
                self.stream.write("\r\x1b[2K")
                self._line_open = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Clear the live line, so whatever is printed next starts clean."""
        if self._line_open and self.stream is not None:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._line_open = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
