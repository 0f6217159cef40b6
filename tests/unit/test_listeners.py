"""Listening sockets shared by worker processes (gateway/listeners.py)."""

from __future__ import annotations

import socket

import pytest
import trio

from gateway.listeners import open_listeners, reserve


async def test_two_sets_of_listeners_share_a_reserved_port() -> None:
    reservation = reserve("127.0.0.1")
    port = reservation.getsockname()[1]
    try:
        first = await open_listeners("127.0.0.1", port, reuse_port=True)
        second = await open_listeners("127.0.0.1", port, reuse_port=True)
        served: list[str] = []

        async def serve(name: str, listeners: list[trio.SocketListener]) -> None:
            while True:
                stream = await listeners[0].accept()
                served.append(name)
                await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, "first", first)
            nursery.start_soon(serve, "second", second)
            for _ in range(40):  # the kernel spreads connections (by a hash of the ports)
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.aclose()
            with trio.fail_after(5):
                while len(served) < 40:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert set(served) == {"first", "second"}
        for listener in first + second:
            await listener.aclose()
    finally:
        reservation.close()


async def test_without_reuse_port_a_port_is_taken_once() -> None:
    first = await open_listeners("127.0.0.1", 0, reuse_port=False)
    port = first[0].socket.getsockname()[1]
    with pytest.raises(OSError):
        await open_listeners("127.0.0.1", port, reuse_port=False)
    with pytest.raises(OSError):  # and a reuse-port socket cannot join a plain one
        await open_listeners("127.0.0.1", port, reuse_port=True)
    for listener in first:
        await listener.aclose()
    assert socket.SO_REUSEPORT  # the platform has it (Linux)
