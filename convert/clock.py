"""Where a run's seconds go: with ``CONVERT_PIPELINE_TIMES=1`` a command prints the seconds of its phases and of
each pipeline stage (``tools/`` benchmarks show these lines), which tells whether the disk, the GPU, the writer or
something before or after the data's path bounds a run."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def enabled() -> bool:
    return os.environ.get("CONVERT_PIPELINE_TIMES") == "1"


def say(line: str) -> None:
    if enabled():
        print(f"convert: {line}", file=sys.stderr, flush=True)


@dataclass
class StageClock:
    """Seconds one stage thread spent waiting (on a queue, a slot or the GPU) and in all."""

    waited: float = 0.0
    began: float = field(default_factory=time.perf_counter)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - t

    def line(self, name: str) -> str:
        total = time.perf_counter() - self.began
        return f"{name} {total:.2f} s ({total - self.waited:.2f} busy, {self.waited:.2f} waiting)"


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): the start-up before a command's
    first phase, interpreter and imports included, which no clock inside the process sees begin."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _start_up_mark() -> list[str]:
    age = process_age()
    return [] if age is None else [f"start-up {age:.2f} s"]


@dataclass
class Phases:
    """Consecutive phases of a command, from the process's start: ``mark(name)`` ends the phase called ``name``."""

    last: float = field(default_factory=time.perf_counter)
    marks: list[str] = field(default_factory=_start_up_mark)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks.append(f"{name} {now - self.last:.2f} s")
        self.last = now

    def report(self) -> None:
        say("phases: " + ", ".join(self.marks))
