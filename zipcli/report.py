"""How the library tells a caller what it is doing: a reporter, never print.

The CLI passes a Rich reporter (progress bars on stderr); Python callers may pass
their own object with these five methods. ``SilentReporter`` drops everything.
"""
from __future__ import annotations

from typing import Protocol


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
