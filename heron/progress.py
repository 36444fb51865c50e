"""Progress of the slow steps of a start: reading tensors, preparing weights, compiling kernels,
building the tokenizer.

On a terminal each step is a tqdm bar on stderr; otherwise (a service, a pipe, a log file) it is
plain log lines under ``heron.progress``: one every few seconds while a step runs and one when
it ends (``reading tensors: 100% (236/236 tensors) in 1.9 s``); a step of one long unit (a
compile) also says when it starts. ``HERON_PROGRESS=bar|log|off``
overrides the choice. A step that runs to its end reports 100 %, even where its total was an
estimate. A leaf module: it imports nothing from heron.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TypeVar

MODE_ENV_VAR = "HERON_PROGRESS"
MODES = ("bar", "log", "off")
LOG_EVERY_S = 5.0  # log mode: a line at most this often while a step runs

logger = logging.getLogger("heron.progress")
T = TypeVar("T")


def progress_mode() -> str:
    """``$HERON_PROGRESS`` when set to a mode, else "bar" on a terminal and "log" elsewhere."""
    chosen = os.environ.get(MODE_ENV_VAR, "").strip().lower()
    if chosen in MODES:
        return chosen
    try:
        return "bar" if sys.stderr is not None and sys.stderr.isatty() else "log"
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return "log"


class Progress:
    """One step: ``update(n)`` as its units complete, ``finish()`` when it ran to its end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it") -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.done = 0
        self.mode = progress_mode()
        self._start = self._last_log = time.monotonic()
        self._bar = None
        if self.mode == "log" and total == 1:  # one long unit: say what is going on
            logger.info("%s ...", desc)
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._log()

    def finish(self) -> None:
        """The step ran to its end: it is at 100 % (its total becomes the count done)."""
        if self._bar is not None and self._bar.total != self.done:
            self._bar.total = self.done
            self._bar.refresh()
        self.total = self.done
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log":
            self._log(final=True)
            self.mode = "closed"

    def _log(self, final: bool = False) -> None:
        self._last_log = time.monotonic()
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        percent = f"{100 * self.done // self.total}% " if self.total else ""
        when = f" in {self._last_log - self._start:.1f} s" if final else ""
        stopped = " (stopped)" if final and self.total != self.done else ""
        logger.info("%s: %s(%s %ss)%s%s", self.desc, percent, count, self.unit, when, stopped)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Yield ``items`` while reporting them as the step ``desc`` (100 % once exhausted)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    progress = Progress(desc, total, unit)
    try:
        for item in items:
            yield item
            progress.update()
    except BaseException:
        progress.close()
        raise
    progress.finish()
