"""What a process costs, read from ``/proc``: resident memory, its peak, and CPU time.

Theory of operation
-------------------
``/proc/PID/status`` has ``VmRSS`` (resident now) and ``VmHWM`` (the peak since start, or
since the peak was last reset). Writing ``5`` to ``/proc/PID/clear_refs`` resets ``VmHWM`` to
the current RSS (Linux >= 4.0; needs the right to write the file, i.e. same user or root), so
"peak growth during one transfer" is ``VmHWM`` after it minus ``VmRSS`` before it, with the
peak reset just before. :class:`PeakSampler` is the fallback when the reset is not allowed: a
thread polling ``VmRSS``.

``/proc/PID/smaps_rollup`` has ``Pss``: resident memory with every shared page divided among
the processes sharing it -- the honest per-process share for forking servers like Dovecot,
whose processes share most of their pages.

CPU time is ``utime + stime`` from ``/proc/PID/stat`` in clock ticks (``SC_CLK_TCK``). For a
forking server (Dovecot: a process per login and per session) :func:`tree_cpu_times` adds the
live descendants and the master's ``cutime + cstime`` -- the time of the children it has
already reaped -- so a session process that ends does not take its CPU time with it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "rss_kib",
    "hwm_kib",
    "pss_kib",
    "cpu_seconds",
    "cpu_times",
    "tree_cpu_times",
    "reset_peak",
    "children",
    "PeakSampler",
    "parse_status_kib",
]

#: How often :class:`PeakSampler` reads VmRSS.
SAMPLE_INTERVAL = 0.002
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_status_kib(text: str, key: str) -> int:
    """The kB value of ``key`` (e.g. ``VmRSS``) in a ``/proc/PID/status`` or ``smaps_rollup``
    text. Raises ``KeyError`` when the key is absent."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == key:
            return int(rest.split()[0])
    raise KeyError(key)


def _status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()


def rss_kib(pid: int) -> int:
    """Resident set size now, KiB."""
    return parse_status_kib(_status(pid), "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size since start or the last :func:`reset_peak`, KiB."""
    return parse_status_kib(_status(pid), "VmHWM")


def pss_kib(pids: Iterable[int]) -> int:
    """Sum of the proportional set sizes of ``pids`` (processes that vanished count 0), KiB."""
    total = 0
    for pid in pids:
        try:
            total += parse_status_kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
        except (OSError, KeyError):
            continue
    return total


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU time the process has used so far, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of ``pid`` and all its descendants, including those that have
    exited and been reaped by it (``cutime``/``cstime``): a forking server's whole cost, which
    does not go down when a session process ends."""
    user = system = 0.0
    for member in [pid, *children(pid)]:
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue  # exited meanwhile: counted in its parent's reaped time from now on
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11]) / _CLOCK_TICKS
        system += int(fields[12]) / _CLOCK_TICKS
        if member == pid:  # reaped children's time; live ones are read one by one
            user += int(fields[13]) / _CLOCK_TICKS
            system += int(fields[14]) / _CLOCK_TICKS
    return user, system


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far, seconds."""
    return sum(cpu_times(pid))


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS; False if the kernel or permissions do not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (from ``/proc/*/stat``'s ppid field)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


class PeakSampler:
    """Polls ``VmRSS`` of ``pid`` in a thread while active; ``peak_kib`` is the largest seen.

    Usage::

        with PeakSampler(pid) as sampler:
            transfer()
        growth = sampler.peak_kib - sampler.start_kib
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.start_kib = 0
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            except OSError:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.start_kib = self.peak_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
        except OSError:
            pass
