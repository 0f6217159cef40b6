"""Sample mailgate with py-spy while a figure runs, and say where its CPU time went.

Theory of operation
-------------------
``bash bench/run --profile --only 6`` attaches ``py-spy record --nonblocking --format raw``
to the mailgate process for the duration of each selected figure. py-spy samples the stacks
of the running process from outside (no code in mailgate changes; ``--nonblocking`` does not
pause it, so the profiled run is only slightly slower) and writes *collapsed stacks*: one line
per distinct stack, ``outer;...;inner COUNT``, idle threads left out.

:func:`summarize` turns that text into the two views that find a hot spot: *self* time (the
innermost frame of each sample: where the CPU actually was) and *inclusive* time (every
function on the stack, counted once per sample: which caller it was for), both as a share of
all samples. Frames are ``function (file:line)``; line numbers are dropped so that one
function is one row.

Figures measured with the profiler attached are not comparable with unprofiled ones: the
table of a ``--profile`` run is for finding hot spots, not for docs/performance.md.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Profiler", "Hotspot", "summarize", "format_hotspots", "py_spy_path"]

#: Samples per second (py-spy's default is 100; more resolves short requests better).
SAMPLE_RATE = 250
#: How long py-spy gets to write its output after SIGINT.
STOP_TIMEOUT = 30.0
#: Rows of each view in the printed summary.
TOP = 15

_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy_path() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@dataclass(frozen=True)
class Hotspot:
    function: str
    share: float  # of all samples, 0..1


def _function(frame: str) -> str:
    """``read (ssl.py:1134)`` -> ``read (ssl.py)``."""
    return _LINE_NUMBER.sub(")", frame.strip())


def summarize(collapsed: str) -> tuple[int, list[Hotspot], list[Hotspot]]:
    """(samples, self-time hot spots, inclusive-time hot spots), most first."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for function in set(frames):
            inclusive[function] += count
    if not total:
        return 0, [], []

    def ranked(counter: Counter[str]) -> list[Hotspot]:
        return [Hotspot(f, n / total) for f, n in counter.most_common()]

    return total, ranked(self_time), ranked(inclusive)


def format_hotspots(title: str, collapsed: str, top: int = TOP) -> str:
    samples, self_time, inclusive = summarize(collapsed)
    if not samples:
        return f"{title}: no samples (mailgate was idle, or py-spy could not attach)\n"
    lines = [f"{title}: {samples} samples of mailgate at {SAMPLE_RATE}/s", "  self time:"]
    lines += [f"    {h.share:6.1%}  {h.function}" for h in self_time[:top]]
    lines.append("  inclusive time:")
    lines += [f"    {h.share:6.1%}  {h.function}" for h in inclusive[:top]]
    return "\n".join(lines) + "\n"


class Profiler:
    """``py-spy record`` attached to ``pid`` while the ``with`` block runs."""

    def __init__(self, pid: int, output: Path, py_spy: str, *, gil_only: bool = False) -> None:
        self.pid = pid
        # --gil: only samples holding the GIL (running Python code), which leaves out time
        # spent preempted inside a syscall -- on a busy machine most of "wall" time.
        self._extra = ["--gil"] if gil_only else []
        self.output = output
        self._py_spy = py_spy
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [self._py_spy, "record", "--pid", str(self.pid), "--rate", str(SAMPLE_RATE),
             "--nonblocking", *self._extra, "--format", "raw", "--output", str(self.output)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def text(self) -> str:
        try:
            return self.output.read_text()
        except OSError:
            return ""
