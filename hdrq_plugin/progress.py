"""Progress a person can follow: bars on a terminal, plain lines in a log (issue 22).

On a terminal, :func:`progress_bar` is tqdm's bar. In a log (CI, ``nohup``, a pipe) a bar
would be one unreadable line of carriage returns, so there bars are silent and :class:`ProgressLog`
writes plain lines instead: one when a :func:`stage` starts and when it ends, and a heartbeat at
least every :data:`HEARTBEAT_S` seconds naming what is running, its progress and the elapsed time,
so a log never goes quiet for minutes (``hdrq demo`` used to print nothing for minutes at a time).
The lines go to stdout: stderr keeps exactly one line for a failure (the CLI's rule), and a log
(``nohup``, CI) collects both streams.

    with stage("quantize hdrq"):
        for _ in progress_bar(range(n), desc="reconstruction", unit="it"):
            ...

``HDRQ_PROGRESS=log`` forces the log lines on a terminal, ``HDRQ_PROGRESS=off`` silences both.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

#: Longest quiet stretch of a log: under the minute the issue asks for, with room for a loaded
#: machine (the heartbeat thread may wake late when both cores are busy).
HEARTBEAT_S = 30.0
_POLL_S = 1.0  # how often the heartbeat thread looks at the clock


def format_elapsed(seconds: float) -> str:
    """``75.2`` → ``"1m15s"``; ``3725`` → ``"1h02m05s"``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _Activity:
    name: str
    started: float
    total: float | None = None
    done: float = 0
    unit: str = ""
    note: str = ""  # a bar's postfix: the task or the loss

    def describe(self, now: float) -> str:
        count = ""
        if self.unit:
            count = f" {self.done:g}/{self.total:g} {self.unit}" if self.total else f" {self.done:g} {self.unit}"
        note = f" [{self.note}]" if self.note else ""
        return f"{self.name}{count}{note} ({format_elapsed(now - self.started)})"


class ProgressLog:
    """Plain progress lines for a log: stage start/end and a heartbeat at least every ``interval_s``.

    ``clock`` and ``stream`` are injectable so the heartbeat is testable without sleeping; with
    ``heartbeat_thread=False`` only :meth:`tick` writes heartbeats (a caller's loop, or a test).
    """

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = HEARTBEAT_S, *, heartbeat_thread: bool = True) -> None:
        self._stream = stream
        self._clock = clock
        self.interval_s = interval_s
        self._use_thread = heartbeat_thread
        self._running: list[_Activity] = []  # innermost last
        self._lock = threading.RLock()
        self._began: float | None = None
        self._last_line = clock()
        self._thread: threading.Thread | None = None

    # -- what is running ------------------------------------------------------------------------

    def begin(self, name: str, *, total: float | None = None, unit: str = "", announce: bool = True) -> _Activity:
        with self._lock:
            now = self._clock()
            quiet_before = not self._running
            if self._began is None:
                self._began = now
            activity = _Activity(name, now, total, 0, unit)
            self._running.append(activity)
            if announce:
                self._write(f"{name}: started")
            elif quiet_before:  # the first heartbeat comes interval_s after work starts
                self._last_line = now
        self._ensure_heartbeat()
        return activity

    def advance(self, activity: _Activity, n: float = 1) -> None:
        activity.done += n

    def end(self, activity: _Activity, *, announce: bool = True, failed: bool = False) -> None:
        with self._lock:
            if activity in self._running:
                self._running.remove(activity)
            if announce:
                took = format_elapsed(self._clock() - activity.started)
                self._write(f"{activity.name}: {'failed after' if failed else 'done in'} {took}")

    @contextmanager
    def stage(self, name: str) -> Iterator[_Activity]:
        """One line when ``name`` starts and one when it ends (with its time); heartbeats between."""
        activity = self.begin(name)
        try:
            yield activity
        except BaseException:
            self.end(activity, failed=True)
            raise
        self.end(activity)

    # -- the heartbeat --------------------------------------------------------------------------

    def tick(self) -> bool:
        """Write a heartbeat if something runs and the log has been quiet ``interval_s``; True if written."""
        with self._lock:
            now = self._clock()
            if not self._running or now - self._last_line < self.interval_s:
                return False
            self._write("running: " + " > ".join(a.describe(now) for a in self._running))
            return True

    def _ensure_heartbeat(self) -> None:
        if not self._use_thread or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._beat, name="hdrq-progress-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            time.sleep(_POLL_S)
            with self._lock:
                if not self._running:
                    self._thread = None
                    return
            self.tick()

    def _write(self, text: str) -> None:
        now = self._clock()
        self._last_line = now
        elapsed = format_elapsed(now - self._began) if self._began is not None else "0s"
        stream = self._stream or sys.stdout
        print(f"[hdrq +{elapsed}] {text}", file=stream, flush=True)


def progress_mode(stream: TextIO | None = None) -> str:
    """``"bars"`` when the bars' stream (stderr) is a terminal, ``"log"`` elsewhere;
    ``HDRQ_PROGRESS`` (bars, log, off) overrides."""
    forced = os.environ.get("HDRQ_PROGRESS", "").strip().lower()
    if forced in ("bars", "log", "off"):
        return forced
    stream = stream or sys.stderr
    return "bars" if getattr(stream, "isatty", lambda: False)() else "log"


#: The process's progress log (stdout).
PROGRESS = ProgressLog()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """A named stage of a command: announced in a log, and on a terminal above the bars."""
    mode = progress_mode()
    if mode == "log":
        with PROGRESS.stage(name):
            yield
        return
    if mode == "bars":
        from tqdm.auto import tqdm

        tqdm.write(f"[hdrq] {name}", file=sys.stdout)  # above the bars; stderr is for errors
    yield


@contextmanager
def timed_stage(timings: dict[str, float], name: str, detail: str = "") -> Iterator[None]:
    """:func:`stage`, with its wall time added to ``timings[name]`` (the demos' report timings):
    ``"quantize_hdrq_s"`` with detail ``"mnist"`` is announced as "quantize hdrq (mnist)"."""
    start = time.perf_counter()
    label = name.removesuffix("_s").replace("_", " ") + (f" ({detail})" if detail else "")
    try:
        with stage(label):
            yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class _LogBar:
    """tqdm's small interface (iterate, update, close, set_postfix, context manager), written as
    heartbeat progress of :data:`PROGRESS` instead of a bar."""

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str, log: ProgressLog,
                 initial: float = 0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n = iterable, total, initial
        self._log = log
        self._activity: _Activity | None = log.begin(desc or "working", total=total, unit=unit, announce=False)
        self._activity.done = initial

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:  # also when the loop stops early: a finished bar must leave the heartbeat
            self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._activity is not None:
            self._log.advance(self._activity, n)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        if self._activity is not None:
            self._activity.note = str(s)

    def close(self) -> None:
        if self._activity is not None:
            self._log.end(self._activity, announce=False)
            self._activity = None

    def __enter__(self) -> _LogBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, disable: bool | None = None, **tqdm_kwargs: Any):
    """tqdm on a terminal; in a log, the heartbeat's progress (``disable=True`` silences both)."""
    mode = "off" if disable else progress_mode()
    if mode == "log":
        return _LogBar(iterable, total, desc, unit, PROGRESS, initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=mode == "off", **tqdm_kwargs)
