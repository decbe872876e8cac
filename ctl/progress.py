"""Progress bars on stderr: one bar for a byte stream (load, save), one line per layer for
pull and push. On a terminal they redraw in place at most ten times a second; otherwise
only state changes are printed, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

from ctl.format import human_size

WIDTH = 30


def _bar(done: int, total: int) -> str:
    if total <= 0:
        return f"{human_size(done)}"
    filled = min(WIDTH, int(WIDTH * done / total))
    arrow = ">" if filled < WIDTH else ""
    return f"[{'=' * max(filled - len(arrow), 0)}{arrow}{' ' * (WIDTH - filled)}] {human_size(done)}/{human_size(total)}"


class Bar:
    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._done = 0
        self._total = 0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        now = time.monotonic()
        if self.tty and (now - self._last >= 0.1 or (total and done >= total)):
            self._last = now
            self.stream.write(f"\r{self.label} {_bar(done, total)}\x1b[K")
            self.stream.flush()
            self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
        elif self._done:
            self.stream.write(f"{self.label} {human_size(self._done)}\n")
        self.stream.flush()


class LayerBoard:
    """Per-layer progress: `update(id, state, done, total)`; states as docker prints them
    (Waiting, Downloading, Extracting, Pull complete, Pushing, Pushed, Layer already exists)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.rows: dict[str, tuple[str, int, int]] = {}
        self._lines = 0
        self._last = 0.0

    def update(self, layer: str, state: str, done: int = 0, total: int = 0) -> None:
        short = layer.removeprefix("sha256:")[:12]
        previous = self.rows.get(short)
        self.rows[short] = (state, done, total)
        if not self.tty:
            if previous is None or previous[0] != state:
                self.stream.write(f"{short}: {state}\n")
                self.stream.flush()
            return
        now = time.monotonic()
        if previous is not None and previous[0] == state and now - self._last < 0.1:
            return
        self._last = now
        self._redraw()

    def _redraw(self) -> None:
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}A")
        for short, (state, done, total) in self.rows.items():
            detail = f" {_bar(done, total)}" if state in ("Downloading", "Pushing", "Extracting") else ""
            self.stream.write(f"\r{short}: {state}{detail}\x1b[K\n")
        self._lines = len(self.rows)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.rows:
            self._redraw()
