"""Progress bars and one-line status messages, all on stderr so stdout stays parseable.

On a terminal progress is a tqdm bar. When stderr is a file or a pipe (a log of a long run) it is a plain
line at most every LOG_INTERVAL seconds plus one when a bar completes, and never a carriage return: a
20-minute run's log stays a few KB instead of half a megabyte of bar redraws. KMFEAT_PROGRESS=0 turns
progress off altogether; KMFEAT_PROGRESS=lines forces the plain lines, =bar the bar.
"""
import os
import sys
import time

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

LOG_INTERVAL = 30.0
"""Seconds between two progress lines in a log."""
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def enabled() -> bool:
    """Progress is on unless KMFEAT_PROGRESS=0."""
    return os.environ.get("KMFEAT_PROGRESS", "1") != "0"


def as_lines() -> bool:
    """Plain lines instead of a bar: stderr is not a terminal (or KMFEAT_PROGRESS=lines)."""
    mode = os.environ.get("KMFEAT_PROGRESS", "")
    if mode in ("lines", "bar"):
        return mode == "lines"
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


class LogLines(std_tqdm):
    """tqdm that writes whole lines, at most one per LOG_INTERVAL seconds and one at completion; nothing to clear."""

    def __init__(self, *args, **kwargs):
        self._line_at = None
        self._finished = False
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "" or self.disable or self.n == 0:
            return False
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if self._finished or (not done and self._line_at is not None and now - self._line_at < LOG_INTERVAL):
            return False
        self._line_at, self._finished = now, done
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        """Nothing was drawn that could be cleared."""

    def update(self, n=1):
        super().update(n)
        if self.total is not None and self.n >= self.total:
            self.display()

    def close(self):
        """One last line for the work done since the previous one (an iterable that ran out, a stopped loop)."""
        if not self.disable and self.n and not self._finished and self._line_at is not None:
            self._line_at = None
            self._finished = True
            self.fp.write(self.__str__() + "\n")
        super().close()


def bar(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """Progress on stderr: a tqdm bar on a terminal, sparse plain lines in a log, nothing with KMFEAT_PROGRESS=0."""
    if enabled() and as_lines():
        known = total is not None or hasattr(iterable, "__len__")
        fmt = LINE_FORMAT if known else "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
        return LogLines(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                        mininterval=LOG_INTERVAL, bar_format=fmt, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, leave=False, **kwargs)


def say(msg: str) -> None:
    """Print a status line on stderr without breaking an active bar."""
    tqdm.write(str(msg), file=sys.stderr)
