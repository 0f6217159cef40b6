"""The octets mailgate hands upstream are exactly the client's: DATA relayed as received (dot
stuffing, bare LF, lone CR, 8-bit untouched), BDAT chunks as sent, for any split of the input.

The lab's Dovecot rewrites bare LF into CRLF before its sink sees a message, so these tests put
a recording SMTP server upstream instead: it accepts any XOAUTH2 token and keeps the raw octets
of every DATA and BDAT it receives. (The real submission server is in test_smtp_e2e.py.)
"""

from __future__ import annotations

import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.protocol.smtp import DataScanner
from tests.fixtures.gateway import start_gateway
from tests.lab import LabDovecot, LabOAuthServer
from tests.fixtures.imap import SeededState
from tests.fixtures.smtp import (
    SmtpGate,
    SmtpWire,
    smtp_config,
)

pytestmark = pytest.mark.lab


@dataclass
class RecordingUpstream:
    """A minimal SMTP server over implicit TLS that records raw message octets."""

    server_tls: ssl.SSLContext
    port: int = 0
    messages: list[bytes] = field(default_factory=list)

    async def run(self, *, task_status: trio.TaskStatus[RecordingUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, self.server_tls, server_side=True)
        buf = bytearray()

        async def line() -> bytes:
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            end = buf.index(b"\r\n") + 2
            out = bytes(buf[:end])
            del buf[:end]
            return out

        async def exactly(n: int) -> bytes:
            while len(buf) < n:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        try:
            await stream.send_all(b"220 recorder ESMTP\r\n")
            chunks: list[bytes] = []
            while True:
                cmd = await line()
                verb = cmd.split(b" ", 1)[0].upper().strip()
                if verb == b"EHLO":
                    await stream.send_all(b"250-recorder\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n"
                                          b"250-CHUNKING\r\n250 AUTH XOAUTH2\r\n")
                elif verb == b"AUTH":
                    await stream.send_all(b"235 2.7.0 ok\r\n")
                elif verb == b"DATA":
                    await stream.send_all(b"354 go\r\n")
                    data = bytearray()
                    while not (b"\r\n" + data).endswith(b"\r\n.\r\n"):
                        data.extend(await line())
                    self.messages.append(bytes(data))
                    await stream.send_all(b"250 2.0.0 recorded\r\n")
                elif verb == b"BDAT":
                    words = cmd.split()
                    chunks.append(await exactly(int(words[1])))
                    if len(words) == 3:
                        self.messages.append(b"".join(chunks))
                        chunks = []
                    await stream.send_all(b"250 2.0.0 chunk\r\n")
                elif verb == b"QUIT":
                    await stream.send_all(b"221 bye\r\n")
                    return
                else:
                    await stream.send_all(b"250 2.0.0 ok\r\n")
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def start_recorder_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot,
                              oauth: LabOAuthServer, seeded: SeededState) -> tuple[SmtpGate, RecordingUpstream]:
    ca = trustme.CA()
    ca_file = tmp_path / "recorder-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_tls)
    recorder = RecordingUpstream(server_tls)
    await nursery.start(recorder.run)
    config = smtp_config(tmp_path, lab, oauth, seeded.upstream_user,
                         smtp=f"localhost:{recorder.port}", ca_file=ca_file)
    shutil.copytree(seeded.state_dir, config.server.state_dir)
    server = await start_gateway(nursery, config)
    gate = SmtpGate(config=config, server=server, lab=lab, oauth=oauth, upstream_user=seeded.upstream_user)
    return gate, recorder


@pytest.fixture
async def recorder_gate(nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
                        smtp_seeded: SeededState) -> tuple[SmtpGate, RecordingUpstream]:
    return await start_recorder_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded)


WIRE_DATA = [
    b"Subject: x\r\n\r\n..stuffed\r\n..\r\n.\r\n",                 # dot lines as stuffed by the client
    b"Subject: lf\n\nbare\nLF\nlines\r\nmixed\r\n.\r\n",           # bare LF kept
    b"Subject: cr\r\n\r\nlone\rCR\r\r\n.\r\n",                      # lone CR kept
    b"Subject: 8bit\r\n\r\n\x00\x01\xff\xfe caf\xe9\r\n.\r\n",      # any octet
    b"Subject: noeol\r\n\r\nx\r\n.\r\n",
    b".\r\n",                                                       # the empty message
]


async def send_raw(gate: SmtpGate, data: bytes, *, cuts: list[int] | None = None) -> int:
    wire = await gate.login()
    assert (await wire.command(f"MAIL FROM:<{gate.upstream_user}>"))[0] == 250
    assert (await wire.command("RCPT TO:<r@example.net>"))[0] == 250
    assert (await wire.command("DATA"))[0] == 354
    last = 0
    for cut in sorted(set(cuts or [])):
        await wire.send(data[last:cut])
        await trio.sleep(0.001)
        last = cut
    await wire.send(data[last:])
    code, _ = await wire.reply()
    await wire.command("QUIT")
    await wire.aclose()
    return code


@pytest.mark.parametrize("data", WIRE_DATA)
async def test_data_octets_reach_the_upstream_unchanged(recorder_gate: tuple[SmtpGate, RecordingUpstream],
                                                       data: bytes) -> None:
    gate, recorder = recorder_gate
    assert await send_raw(gate, data, cuts=[1, 2, len(data) - 3, len(data) - 1]) == 250
    assert recorder.messages == [data]


async def test_bdat_octets_reach_the_upstream_unchanged(recorder_gate: tuple[SmtpGate, RecordingUpstream]) -> None:
    gate, recorder = recorder_gate
    body = b"Subject: b\n\r\n.\r\n\x00binary\r\n.\r\n"  # no stuffing in BDAT: a dot line is data
    wire = await gate.login()
    assert (await wire.command(f"MAIL FROM:<{gate.upstream_user}> BODY=BINARYMIME"))[0] == 250
    assert (await wire.command("RCPT TO:<r@example.net>"))[0] == 250
    await wire.send(b"BDAT 7\r\n" + body[:7] + b"BDAT %d LAST\r\n" % (len(body) - 7) + body[7:])
    assert [(await wire.reply())[0] for _ in range(2)] == [250, 250]
    await wire.aclose()
    assert recorder.messages == [body]


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"\xe9", b" "]), max_size=40),
       st.lists(st.integers(min_value=1, max_value=200), max_size=4))
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_bodies_reach_the_upstream_unchanged(tmp_path_factory: pytest.TempPathFactory,
                                                   lab: LabDovecot, oauth_server: LabOAuthServer,
                                                   smtp_seeded: SeededState, pieces: list[bytes],
                                                   cuts: list[int]) -> None:
    data = b"".join(pieces) + b"\r\n.\r\n"
    scanner = DataScanner()
    step = scanner.feed(data)
    # Only messages whose end is the final CRLF.CRLF and that mailgate relays (refusals and
    # pipelined commands have their own tests).
    assume(step.done and not step.rest and scanner.refusal is None)
    tmp_path = tmp_path_factory.mktemp("smtp-bytes")

    async def main() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            gate, recorder = await start_recorder_gate(nursery, tmp_path, lab, oauth_server, smtp_seeded)
            code = await send_raw(gate, data, cuts=[c % len(data) for c in cuts if c % len(data)])
            assert code == 250
            nursery.cancel_scope.cancel()
            return recorder.messages

    assert trio.run(main) == [data]
