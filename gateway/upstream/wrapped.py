"""A byte stream that passes everything to the stream it wraps.

Theory of operation
-------------------
:class:`WrappedStream` implements every ``trio.abc.Stream`` method by calling the same method
of the wrapped stream. A wrapper that changes one behaviour subclasses it and overrides only
that method: the proxy tunnel's replay of bytes already read (:mod:`gateway.upstream.proxy`),
the relay's stream whose ``aclose`` also frees the upstream slot
(:mod:`gateway.upstream.transport`).
"""

from __future__ import annotations

import trio

__all__ = ["WrappedStream"]


class WrappedStream(trio.abc.Stream):
    """``stream``, unchanged; subclasses override what they change."""

    def __init__(self, stream: trio.abc.Stream):
        self._stream = stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()
