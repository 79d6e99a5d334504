"""What a training run says while it runs: printed, and saved as ``console.log`` in the run folder.

Lines logged before the run folder is claimed (data preparation, the folder decision) are kept and
written to the log once it exists, so the file holds the whole story. Progress is a tqdm bar (loss,
events/s, ETA) on a terminal and a plain line every ``every_s`` seconds otherwise (CI, ``nohup``,
a pipe); the plain lines always go to the log file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


class Console:
    def __init__(self, echo: Callable[[str], None] = print):
        self.echo = echo
        self.file: Path | None = None
        self._pending: list[str] = []

    def __call__(self, message: str) -> None:
        """Print ``message`` (flushed: off a terminal stdout is block-buffered, and progress lines
        would arrive minutes late) and keep it in the log."""
        self.echo(message)
        sys.stdout.flush()
        self.keep(message)

    def keep(self, message: str) -> None:
        """Keep ``message`` in the log without printing it."""
        if self.file is None:
            self._pending.append(message)
            return
        with open(self.file, "a") as f:
            f.write(message + "\n")

    def attach(self, path: Path) -> None:
        """Start writing to ``path`` (appending: a resumed run continues its log), pending lines first."""
        self.file = path
        pending, self._pending = self._pending, []
        for message in pending:
            self.keep(message)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Progress through one epoch's steps: a bar on a terminal, periodic plain lines otherwise."""

    def __init__(self, console: Console, label: str, done: int, total: int, *, enabled: bool, every_s: float,
                 terminal: bool | None = None):
        self.console, self.label, self.total = console, label, total
        self.done = self.start_done = done
        self.every_s = every_s
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(desc=label, initial=done, total=total, leave=False, dynamic_ncols=True,
                        disable=not (enabled and self.terminal))
        self.started = self.last = time.perf_counter()
        self.events = 0

    def step(self, events: int, loss: float) -> None:
        self.done += 1
        self.events += events
        now = time.perf_counter()
        rate = self.events / max(now - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{rate:,.0f}", refresh=False)
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            per_step = (now - self.started) / max(self.done - self.start_done, 1)
            line = (f"[train] {self.label} step {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                    f"loss {loss:.4f} {rate:,.0f} events/s eta {_duration(per_step * (self.total - self.done))}")
            (self.console.keep if self.terminal else self.console)(line)

    def close(self) -> None:
        self.bar.close()
