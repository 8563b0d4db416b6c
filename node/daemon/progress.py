"""A one-line progress bar on stderr for large transfers (no dependency).

Shown only when stderr is a terminal or ``--progress`` is given, and only for transfers of at
least ``LARGE`` bytes unless forced; redrawn at most ten times a second so it never costs
measurable time. ``--json`` output is unaffected: the bar goes to stderr.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LARGE = 8 << 20  # bytes; smaller transfers finish before a bar is worth drawing


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, total: int | None, label: str, *, enabled: bool,
                 stream: TextIO | None = None, width: int = 30) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    @classmethod
    def for_transfer(cls, total: int | None, label: str, mode: bool | None) -> Progress:
        """``mode``: True (``--progress``), False (``--no-progress``), None (auto: TTY+large)."""
        if mode is None:
            enabled = sys.stderr.isatty() and (total is None or total >= LARGE)
        else:
            enabled = mode
        return cls(total, label, enabled=enabled)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def set(self, done: int) -> None:
        self.update(done - self.done)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = f"{_fmt_bytes(self.done / elapsed)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            line = (f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                    f"{_fmt_bytes(self.done)}/{_fmt_bytes(self.total)} {rate}")
        else:
            line = f"\r{self.label} {_fmt_bytes(self.done)} {rate}"
        self.stream.write(line + "\033[K" if self.stream.isatty() else line)
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.finish()
        elif self.enabled and self._drawn:
            self.stream.write("\n")
