"""Progress of an import: a tqdm bar (runs, points, rate, ETA) on a terminal, plain lines
every few seconds otherwise (a log file, CI)."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """advance(runs=, points=) after each run; close() at the end. enabled=False is silent."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO = sys.stderr,
                 interval: float = 5.0):
        self.enabled = enabled
        self.stream = stream
        self.interval = interval
        self.total = total
        self.runs = self.points = 0
        self.bar = None
        self.lock = threading.Lock()  # writer threads and the main thread both advance

    def start(self, total: int) -> None:
        self.total = total
        self.t0 = self.last = time.monotonic()
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=" runs", file=self.stream, dynamic_ncols=True,
                            smoothing=0.1)

    def advance(self, runs: int = 0, points: int = 0) -> None:
        with self.lock:
            self._advance(runs, points)

    def _advance(self, runs: int, points: int) -> None:
        self.runs += runs
        self.points += points
        if not self.enabled:
            return
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.points:,} points, "
                                     f"{self.points / max(now - self.t0, 1e-9):,.0f} points/s",
                                     refresh=False)
            self.bar.update(runs)
        elif now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        dt = max(now - self.t0, 1e-9)
        eta = ""
        if self.runs and self.total > self.runs:
            eta = f", about {(self.total - self.runs) * dt / self.runs:.0f} s left"
        return (f"trackd import: {self.runs:,}/{self.total:,} runs, {self.points:,} points, "
                f"{self.points / dt:,.0f} points/s{eta}")

    def abandon(self) -> None:
        """After an interruption: ends the bar's line (tqdm's close does), so what follows
        starts on its own."""
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.total:
            self.stream.write(self.line(time.monotonic()) + "\n")
            self.stream.flush()
