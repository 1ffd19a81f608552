"""How the library tells a caller what it is doing: a reporter, never print.

The CLI passes a Rich reporter (progress bars on stderr). Python callers get
``LoggingReporter`` by default (the ``zipit`` logger and Python warnings), or pass
their own object with these five methods; ``SilentReporter`` drops everything.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Protocol

from .errors import ZipitWarning


class Reporter(Protocol):
    def start(self, phase: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def done(self) -> None: ...
    def warn(self, message: str) -> None: ...
    def info(self, message: str) -> None: ...


class SilentReporter:
    def start(self, phase, total=None): pass
    def advance(self, n=1): pass
    def done(self): pass
    def warn(self, message): pass
    def info(self, message): pass


class LoggingReporter:
    """The default for Python callers: progress on the ``zipit`` logger (INFO, silent until logging is
    configured), warnings as Python warnings (``ZipitWarning``) that filters and pytest see."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("zipit")
        self.phase, self.total, self.count, self.started = "", None, 0, 0.0

    def start(self, phase: str, total: int | None = None) -> None:
        self.phase, self.total, self.count, self.started = phase, total, 0, time.perf_counter()
        self.log.info("%s: started%s", phase, f" ({total} steps)" if total else "")

    def advance(self, n: int = 1) -> None:
        before, self.count = self.count, self.count + n
        if self.total and before * 4 // self.total < self.count * 4 // self.total < 4:   # every quarter
            self.log.info("%s: %d/%d", self.phase, self.count, self.total)

    def done(self) -> None:
        self.log.info("%s: done in %.1f s", self.phase, time.perf_counter() - self.started)

    def warn(self, message: str) -> None:
        warnings.warn(message, ZipitWarning, stacklevel=3)

    def info(self, message: str) -> None:
        self.log.info(message)
