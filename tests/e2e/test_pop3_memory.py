"""A big message RETRs through mailgate without growing the process by anything like its size.

The test uses 24 MiB to stay quick; benchmark figure 7a (``bench/``) measures the same for a
50 MB message in a separate mailgate process (0.2 MB of growth when last run).

The gateway runs in this test process, so the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) bounds what the whole RETR path (upstream FETCH literal → sans-IO
encoder → batched TLS writes) held at once. The client side reads and hashes 64 KiB at a time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from tests.fixtures.imap import SeededState
from tests.fixtures.pop3 import start_pop_gate
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import big_message_chunks

pytestmark = pytest.mark.lab

BIG = 24 * 1024 * 1024
#: Peak RSS growth allowed during the RETR: a third of the message (buffering it whole would
#: cost several times its size; streaming costs a few hundred KiB).
MAX_GROWTH = 8 * 1024 * 1024
STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
async def test_big_retr_streams(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                                 oauth_server: LabOAuthServer, pop3_seeded: SeededState) -> None:
    gate = await start_pop_gate(nursery, tmp_path, lab, oauth_server, pop3_seeded)
    seeded = hashlib.sha256()

    def chunks_hashed():  # type: ignore[no-untyped-def]
        for chunk in big_message_chunks(BIG):
            seeded.update(chunk)
            yield chunk

    await trio.to_thread.run_sync(
        lambda: seed.append(lab, gate.upstream_user, chunks_hashed(), gate.mailbox, size=BIG)
    )
    expected = seeded.hexdigest()
    w = await gate.login()
    assert await w.command("LIST 1") == b"+OK 1 %d\r\n" % BIG
    _reset_peak()
    before = _status_kib("VmRSS")
    await w.send(b"RETR 1\r\n")
    assert await w.line() == b"+OK %d octets\r\n" % BIG
    digest = hashlib.sha256()
    tail = bytes(w.buf)
    w.buf.clear()
    received = 0
    with trio.fail_after(60):
        while True:
            chunk = await w.stream.receive_some(65536)
            assert chunk, "connection ended before the end of RETR"
            data = tail + chunk
            # Keep the last 5 bytes back: they may be (part of) the terminator.
            digest.update(data[:-5])
            received += len(data) - 5
            tail = data[-5:]
            if tail == b"\r\n.\r\n":
                break
    digest.update(b"\r\n")  # the message's own final CRLF, then ".\r\n"
    received += 2
    peak_growth = (_status_kib("VmHWM") - before) * 1024
    assert received == BIG
    assert digest.hexdigest() == expected
    assert peak_growth < MAX_GROWTH, f"peak RSS grew by {peak_growth / 2**20:.1f} MiB"
    await w.command("QUIT")
    await w.eof()
