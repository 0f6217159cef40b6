"""Measurement arithmetic and the result table: pure functions, no I/O, no clocks.

Theory of operation
-------------------
Every benchmark figure compares *mailgate* with a *baseline* measured in the same run on the
same machine (these machines are shared and noisy, so absolute numbers alone mean little).
A figure is a :class:`Figure`: two :class:`Measurement` values, a :class:`Target` that says how
they must relate, and notes; optionally the same measurement of *peers* (other programs a user
would run instead), each shown on its own row below the figure as ``mailgate vs PEER`` with
the ratio mailgate / peer, and judged against no target. A measurement that could not be taken carries ``na`` -- the
reason -- instead of a value, and the table prints ``n/a (reason)``: a missing part never
crashes the run.

Targets come in four shapes, matching the issue's wording:

* :class:`MinRatio` -- ``mailgate / baseline >= k`` (throughput, logins per second);
* :class:`MaxDelta` -- ``mailgate - baseline <= d`` (latency within d ms of the baseline);
* :class:`MaxValue` -- ``mailgate <= limit`` (memory growth, per-session memory, CPU);
* :class:`MaxValue` with limit 0 doubles as "zero failures".

:func:`format_table` renders the figures as a fixed-width text table, :func:`to_json` as the
JSON document written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "median",
    "percentile",
    "ratio",
    "megabytes_per_second",
    "Measurement",
    "Target",
    "MinRatio",
    "MaxDelta",
    "MaxValue",
    "Figure",
    "format_table",
    "to_json",
]

#: Bytes in the "MB" of every throughput and memory figure (decimal megabyte, as curl uses).
MEGABYTE = 1_000_000


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method). Raises ``ValueError`` for an empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * pct / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(values, 50)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or ``None`` when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def megabytes_per_second(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (decimal)."""
    if seconds <= 0:
        raise ValueError("a transfer takes a positive time")
    return nbytes / MEGABYTE / seconds


@dataclass(frozen=True)
class Measurement:
    """One side of a figure: a value in ``unit``, or ``na`` saying why there is none.

    ``detail`` is a short human-readable addition (e.g. ``"p99 12.3"``), ``extra`` holds every
    raw number worth keeping in the JSON.
    """

    value: float | None = None
    unit: str = ""
    detail: str = ""
    na: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def missing(cls, reason: str) -> Measurement:
        return cls(na=reason)

    @property
    def ok(self) -> bool:
        return self.value is not None and self.na is None

    def render(self) -> str:
        if not self.ok:
            return f"n/a ({self.na or 'not measured'})"
        text = f"{_number(self.value)} {self.unit}".rstrip()
        return f"{text} ({self.detail})" if self.detail else text


class Target:
    """How mailgate's value must relate to the baseline."""

    text: str = ""

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        """True/False, or None when the figure lacks what the target needs."""
        raise NotImplementedError


@dataclass(frozen=True)
class MinRatio(Target):
    """mailgate / baseline >= minimum (bigger is better)."""

    minimum: float

    @property
    def text(self) -> str:  # type: ignore[override]
        return f">= {self.minimum:g}x"

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        r = ratio(mailgate.value if mailgate.ok else None,
                  baseline.value if baseline.ok else None)
        return None if r is None else r >= self.minimum


@dataclass(frozen=True)
class MaxDelta(Target):
    """mailgate - baseline <= maximum (in the measurements' unit)."""

    maximum: float
    unit: str

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"<= +{self.maximum:g} {self.unit}"

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        if not (mailgate.ok and baseline.ok):
            return None
        assert mailgate.value is not None and baseline.value is not None
        return mailgate.value - baseline.value <= self.maximum


@dataclass(frozen=True)
class MaxValue(Target):
    """mailgate's own value <= maximum, whatever the baseline (memory, failures, CPU)."""

    maximum: float
    unit: str

    @property
    def text(self) -> str:  # type: ignore[override]
        return f"<= {self.maximum:g} {self.unit}".rstrip()

    def met(self, mailgate: Measurement, baseline: Measurement) -> bool | None:
        if not mailgate.ok:
            return None
        assert mailgate.value is not None
        return mailgate.value <= self.maximum


@dataclass(frozen=True)
class Figure:
    """One row of the result table."""

    key: str  # "1", "2", ... "7a" -- what --only selects by its number
    name: str
    client: str  # which client drove it (the issue asks to say so)
    mailgate: Measurement
    baseline: Measurement
    target: Target
    notes: tuple[str, ...] = ()
    #: (peer name, its measurement) -- what a user would run instead, same client, same lab
    peers: tuple[tuple[str, Measurement], ...] = ()

    def peer_ratio(self, peer: Measurement) -> float | None:
        """mailgate / peer, as :attr:`ratio` is mailgate / baseline."""
        return ratio(self.mailgate.value if self.mailgate.ok else None,
                     peer.value if peer.ok else None)

    @property
    def ratio(self) -> float | None:
        return ratio(self.mailgate.value if self.mailgate.ok else None,
                     self.baseline.value if self.baseline.ok else None)

    @property
    def delta(self) -> float | None:
        if not (self.mailgate.ok and self.baseline.ok):
            return None
        assert self.mailgate.value is not None and self.baseline.value is not None
        return self.mailgate.value - self.baseline.value

    @property
    def met(self) -> bool | None:
        return self.target.met(self.mailgate, self.baseline)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "client": self.client,
            "mailgate": asdict(self.mailgate),
            "baseline": asdict(self.baseline),
            "ratio": self.ratio,
            "delta": self.delta,
            "target": self.target.text,
            "met": self.met,
            "notes": list(self.notes),
            "peers": {name: {**asdict(peer), "mailgate_ratio": self.peer_ratio(peer)}
                      for name, peer in self.peers},
        }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _met_text(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "?"}[met]


TABLE_COLUMNS = ("#", "figure", "mailgate", "baseline", "ratio", "target", "met?")


def format_table(figures: Sequence[Figure]) -> str:
    """A fixed-width text table: one row per figure, then the client of every figure."""
    rows = [TABLE_COLUMNS]
    for fig in figures:
        r = fig.ratio
        rows.append((
            fig.key,
            fig.name,
            fig.mailgate.render(),
            fig.baseline.render(),
            "-" if r is None else f"{r:.2f}x",
            fig.target.text,
            _met_text(fig.met),
        ))
        for name, peer in fig.peers:
            pr = fig.peer_ratio(peer)
            rows.append(("", f"  mailgate vs {name}", "", peer.render(),
                         "-" if pr is None else f"{pr:.2f}x", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for fig in figures:
        lines.append(f"[{fig.key}] client: {fig.client}")
        lines.extend(f"    {note}" for note in fig.notes)
    return "\n".join(lines) + "\n"


def to_json(figures: Sequence[Figure], machine: dict[str, Any], settings: dict[str, Any]
            ) -> dict[str, Any]:
    """The JSON document of one run."""
    return {
        "machine": machine,
        "settings": settings,
        "figures": [fig.as_dict() for fig in figures],
    }
