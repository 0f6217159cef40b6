"""Cutting a byte stream at arbitrary points, for split-invariance property tests."""

from __future__ import annotations


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at each of ``cuts`` (taken modulo ``len(data) + 1``); joined, the pieces
    give ``data`` back. Empty pieces are kept: a parser must accept them too."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out
