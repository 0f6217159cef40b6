"""The lab's SMTP sink: where the lab submission server (Dovecot) relays every message it accepts.

Theory of operation
-------------------
:class:`LabSmtpSink` is an aiosmtpd server on a free 127.0.0.1 port, running its own asyncio
loop in a thread (test infrastructure only: mailgate itself is trio). It accepts every message
and stores it under ``DIR/N.eml`` (the message as received, dot-unstuffed, nothing else) with
``DIR/N.json`` beside it (``mail_from``, ``rcpt_tos``, ``size``), written atomically in that
order, so a reader that sees the ``.json`` sees the whole message. :meth:`LabSmtpSink.messages`
returns what arrived, in order; :meth:`LabSmtpSink.wait_for` polls until a message for a given
recipient is there.

Scripted answers, so that tests can provoke per-recipient and temporary failures upstream:

=====================================  ==============================================
recipient local part starts with       answer to RCPT TO
=====================================  ==============================================
``refuse``                             ``550 5.1.1 <addr>: Recipient address rejected``
``throttle``                           ``451 4.7.0 Temporary rate limit, try again later``
anything else                          ``250 OK``
=====================================  ==============================================

It advertises SIZE (:data:`SIZE_LIMIT`), 8BITMIME and SMTPUTF8, and accepts lines up to
:data:`LINE_LIMIT` octets (the lab corpus has a 5,000-byte line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["LabSmtpSink", "SinkMessage", "SIZE_LIMIT"]

#: The SIZE the sink advertises (and enforces): 64 MiB, above the benchmark's 20 MB message.
SIZE_LIMIT = 64 * 1024 * 1024
#: Longest line the sink accepts (RFC 5321's 1000 is too small for the lab corpus).
LINE_LIMIT = 1024 * 1024
#: How long :meth:`LabSmtpSink.wait_for` waits by default.
WAIT_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class SinkMessage:
    """One stored message: its envelope and the path of its bytes."""

    index: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    path: Path

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


class _Handler:
    def __init__(self, sink: LabSmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        local = address.split("@", 1)[0].lower()
        if local.startswith("refuse"):
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        if local.startswith("throttle"):
            return "451 4.7.0 Temporary rate limit, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self._sink._store(envelope.mail_from or "", list(envelope.rcpt_tos), content)
        return "250 2.0.0 Ok: stored"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LabSmtpSink:
    """An SMTP server that stores every message it is given (see the module docstring)."""

    host = "127.0.0.1"

    def __init__(self, directory: Path | None = None) -> None:
        self._owns_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="mailgate-sink-"))
        self.port = 0
        self._controller: Controller | None = None
        self._lock = threading.Lock()
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> LabSmtpSink:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        kwargs: dict[str, Any] = {"data_size_limit": SIZE_LIMIT, "enable_SMTPUTF8": True,
                                  "decode_data": False, "server_hostname": "sink.lab"}
        self._loop = asyncio.new_event_loop()  # closed by stop(): aiosmtpd leaves its own open
        try:
            controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                    loop=self._loop, ready_timeout=10, **kwargs)
            controller.start()
        except BaseException:
            self._loop.close()
            raise
        # aiosmtpd's line limit is a class attribute of its SMTP protocol.
        SMTP.line_length_limit = LINE_LIMIT
        # At debug level aiosmtpd logs every line of every message: never wanted here.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
        if self._owns_dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LabSmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ storage

    def _store(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> None:
        with self._lock:
            self._count += 1
            index = self._count
        eml = self.dir / f"{index:06d}.eml"
        meta = self.dir / f"{index:06d}.json"
        tmp = eml.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, eml)
        tmp.write_text(json.dumps({"mail_from": mail_from, "rcpt_tos": rcpt_tos, "size": len(content)}))
        os.replace(tmp, meta)

    def messages(self) -> list[SinkMessage]:
        """Every message stored so far, oldest first."""
        found = []
        for meta in sorted(self.dir.glob("*.json")):
            doc = json.loads(meta.read_text())
            found.append(SinkMessage(int(meta.stem), doc["mail_from"], tuple(doc["rcpt_tos"]),
                                     meta.with_suffix(".eml")))
        return found

    def for_recipient(self, rcpt: str) -> list[SinkMessage]:
        return [m for m in self.messages() if rcpt in m.rcpt_tos]

    def wait_for(self, rcpt: str, count: int = 1, timeout: float = WAIT_TIMEOUT) -> list[SinkMessage]:
        """The messages for ``rcpt`` once there are at least ``count`` (AssertionError after
        ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.for_recipient(rcpt)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} messages for {rcpt} reached the sink")
            time.sleep(POLL_INTERVAL)
