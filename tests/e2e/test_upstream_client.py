"""The upstream IMAP client and OAuth login against the real lab (Dovecot + local OAuth server)."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from gateway.config import Limits, ProviderConfig
from gateway.errors import ReauthorizationRequired, UpstreamError
from gateway.upstream.client import RECEIVE_SIZE, MessageVanished, UnsafeExpunge, UpstreamIMAP, UpstreamNo
from gateway.upstream.login import open_upstream
from tests.fixtures.upstream import LabAccount
from tests.lab import LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import CORPUS, big_message_chunks, big_message_sha256, crlf_normalise

pytestmark = pytest.mark.lab

LIMITS = Limits(upstream_connect_timeout=10, upstream_command_timeout=20)


def lab_provider(lab: LabDovecot, oauth: LabOAuthServer, *, port: str = "imaps", tls: str = "implicit",
                 mech: str = "xoauth2", ca_file: Path | None = None, use_lab_ca: bool = True) -> ProviderConfig:
    return ProviderConfig(
        name="lab", imap=f"{lab.host}:{lab.ports[port]}", imap_tls=tls, sasl=mech,
        ca_file=ca_file or (lab.ca_file if use_lab_ca else None),
        authorize_url=oauth.authorize_url, token_url=oauth.token_url, client_id="mailgate",
    )


async def login(lab: LabDovecot, oauth: LabOAuthServer, user: str, **kw: Any) -> UpstreamIMAP:
    return await open_upstream(LabAccount(oauth, user, lab_provider(lab, oauth, **kw)), LIMITS)


# ---------------------------------------------------------------- login


@pytest.mark.parametrize(("port", "tls", "mech"), [("imaps", "implicit", "xoauth2"),
                                                    ("imap", "starttls", "oauthbearer")])
async def test_login_and_select(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str,
                                port: str, tls: str, mech: str) -> None:
    client = await login(lab, oauth_server, lab_user, port=port, tls=tls, mech=mech)
    try:
        assert "IMAP4REV1" in client.capabilities
        assert not any(c.startswith("AUTH=") for c in client.capabilities)  # post-auth list
        info = await client.select("INBOX")
        assert info.exists == 0 and info.uidvalidity and info.uidnext == 1
        assert "\\Seen" in info.flags
        assert await client.fetch_sizes() == []
    finally:
        await client.logout(5.0)


async def test_revoked_token_is_refreshed_once(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str) -> None:
    account = LabAccount(oauth_server, lab_user, lab_provider(lab, oauth_server))
    oauth_server.revoke(account.token)
    events: list[dict[str, Any]] = []
    client = await open_upstream(account, LIMITS, publish=events.append)
    await client.logout(5.0)
    assert account.refreshes == 1
    assert [(e["type"], e["user"]) for e in events] == [("upstream.connected", lab_user)]


@pytest.mark.parametrize("mech", ["xoauth2", "oauthbearer"])
async def test_rejected_fresh_token_needs_reauthorization(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                         lab_user: str, mech: str) -> None:
    account = LabAccount(oauth_server, lab_user, lab_provider(lab, oauth_server, mech=mech), revoke_fresh=True)
    oauth_server.revoke(account.token)
    events: list[dict[str, Any]] = []
    with pytest.raises(ReauthorizationRequired) as info:
        await open_upstream(account, LIMITS, publish=events.append)
    assert account.refreshes == 1
    assert account.token not in str(info.value)
    assert events == [{"type": "upstream.error", "user": lab_user, "upstream": account.provider.imap,
                       "reason": "reauthorization_required", "detail": str(info.value)}]


async def test_token_for_another_user_is_refused(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str) -> None:
    account = LabAccount(oauth_server, lab_user, lab_provider(lab, oauth_server))
    account.upstream_user = lab.new_user()
    with pytest.raises(ReauthorizationRequired):
        await open_upstream(account, LIMITS)


async def test_untrusted_certificate_is_a_clear_error(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                      lab_user: str, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    for kw in ({"ca_file": other_ca}, {"use_lab_ca": False}, {"ca_file": other_ca, "port": "imap", "tls": "starttls"}):
        with pytest.raises(UpstreamError, match="certificate .* is not trusted"):
            await login(lab, oauth_server, lab_user, **kw)


async def test_connection_refused_is_upstream_error(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str) -> None:
    with trio.socket.socket() as sock:  # a bound port that does not listen
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        provider = lab_provider(lab, oauth_server).model_copy(update={"imap": f"127.0.0.1:{port}"})
        with pytest.raises(UpstreamError, match="cannot connect"):
            await open_upstream(LabAccount(oauth_server, lab_user, provider), LIMITS)


# ---------------------------------------------------------------- reading


async def test_fetch_sizes_and_bodies_match_direct_fetch(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                        lab_user: str) -> None:
    names = ["simple", "bare_lf", "dot_lines", "long_line", "no_final_newline", "nested_multipart", "empty_body"]
    uids = [seed.append(lab, lab_user, CORPUS[name]) for name in names]
    client = await login(lab, oauth_server, lab_user)
    try:
        info = await client.select("INBOX")
        assert info.exists == len(names)
        sizes = await client.fetch_sizes()
        assert [uid for uid, _ in sizes] == uids
        for (uid, size), name in zip(sizes, names):
            direct = seed.fetch_raw(lab, lab_user, uid)
            assert direct == crlf_normalise(CORPUS[name])
            assert size == len(direct)
            async with client.stream_body(uid) as body:
                got = b"".join([chunk async for chunk in body])
            assert got == direct
            assert body.size == len(direct)
        # partial fetch and headers only
        async with client.stream_body(uids[0], b"BODY.PEEK[HEADER]") as body:
            header = b"".join([c async for c in body])
        assert header == seed.fetch_raw(lab, lab_user, uids[0]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        async with client.stream_body(uids[0], partial=(0, 10)) as body:
            assert b"".join([c async for c in body]) == seed.fetch_raw(lab, lab_user, uids[0])[:10]
        # the connection stays usable after a body the caller did not read
        async with client.stream_body(uids[1]):
            pass
        assert b"\\Seen" not in (await client.fetch_attrs([uids[1]], b"FLAGS"))[uids[1]][b"FLAGS"]
    finally:
        await client.logout(5.0)
    assert "\\Seen" not in seed.flags(lab, lab_user, uids[0])  # BODY.PEEK leaves no trace


async def test_vanished_message(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str) -> None:
    uid = seed.append(lab, lab_user, CORPUS["simple"])
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        with pytest.raises(MessageVanished):
            async with client.stream_body(uid + 100):
                pass
        async with client.stream_body(uid) as body:  # still usable
            assert b"".join([c async for c in body]) == CORPUS["simple"]
        with pytest.raises(UpstreamNo):
            await client.select("No such folder")
        await client.select("INBOX")
        # expunged by another session while selected here: Dovecot answers BODY[] NIL
        await trio.to_thread.run_sync(_expunge_directly, lab, lab_user, uid)
        with pytest.raises(MessageVanished):
            async with client.stream_body(uid):
                pass
        assert (await client.command(b"NOOP")).ok
    finally:
        await client.logout(5.0)


def _expunge_directly(lab: LabDovecot, user: str, uid: int) -> None:
    with seed.imap_session(lab, user) as imap:
        imap.select("INBOX")
        imap.command(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
        imap.command(b"UID EXPUNGE %d" % uid)


async def test_big_body_streams_with_bounded_memory(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                    lab_user: str) -> None:
    size = 20 * 1024 * 1024
    uid = seed.append(lab, lab_user, big_message_chunks(size), size=size)
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        assert await client.fetch_sizes() == [(uid, size)]
        digest = hashlib.sha256()
        total = max_chunk = 0
        growth: int | None = None
        # Trace allocations over an 8 MB window of the transfer (tracing all of it is slow):
        # holding the body would grow memory by those 8 MB.
        window = (4 * 1024 * 1024, 12 * 1024 * 1024)
        was_tracing = tracemalloc.is_tracing()
        baseline: int | None = None
        try:
            async with client.stream_body(uid) as body:
                async for chunk in body:
                    digest.update(chunk)
                    total += len(chunk)
                    max_chunk = max(max_chunk, len(chunk))
                    if baseline is None and total >= window[0]:
                        if not was_tracing:
                            tracemalloc.start()
                        tracemalloc.reset_peak()
                        baseline = tracemalloc.get_traced_memory()[0]
                    elif baseline is not None and growth is None and total >= window[1]:
                        growth = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            if not was_tracing:
                tracemalloc.stop()
    finally:
        await client.logout(5.0)
    assert total == size == body.size
    assert digest.hexdigest() == big_message_sha256(size)
    assert max_chunk <= RECEIVE_SIZE
    assert growth is not None and growth < 2 * 1024 * 1024  # nothing like the 8 MB window was held


# ---------------------------------------------------------------- changing


async def test_store_expunge_move_and_special_use(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                  lab_user: str) -> None:
    uids = [seed.append(lab, lab_user, CORPUS[n]) for n in ("simple", "dot_lines", "long_line", "empty_body")]
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        assert await client.find_special_use("\\Trash") == "Trash"
        assert await client.find_special_use("\\Sent") == "Sent"
        assert await client.find_special_use("\\Flagged") is None
        await client.uid_store([uids[0]], b"+FLAGS.SILENT (\\Seen)")
        assert seed.flags(lab, lab_user, uids[0]) == {"\\Seen"}
        await client.uid_store(uids[1:3], b"+FLAGS.SILENT (\\Deleted)")
        await client.uid_expunge([uids[1]])  # only this one, though uids[2] is \Deleted too
        assert seed.list_uids(lab, lab_user) == [uids[0], uids[2], uids[3]]
        await client.uid_move([uids[3]], "Trash")
        assert seed.list_uids(lab, lab_user) == [uids[0], uids[2]]
        assert len(seed.list_uids(lab, lab_user, "Trash")) == 1
    finally:
        await client.logout(5.0)


async def test_without_uidplus_the_client_refuses_to_expunge(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                              lab_user: str) -> None:
    """A plain EXPUNGE would also remove what other clients marked \\Deleted: refused, before
    anything is sent (a server without UIDPLUS, as the client sees it)."""
    uids = [seed.append(lab, lab_user, CORPUS[n]) for n in ("simple", "dot_lines")]
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        await client.uid_store(uids, b"+FLAGS.SILENT (\\Deleted)")  # as another client might have
        client.capabilities = client.capabilities - {"UIDPLUS", "MOVE"}
        with pytest.raises(UnsafeExpunge, match="lacks UIDPLUS.*nothing was changed"):
            await client.uid_expunge([uids[0]])
        with pytest.raises(UnsafeExpunge):
            await client.uid_move([uids[1]], "Trash")  # its fallback would end in EXPUNGE
        assert (await client.command(b"NOOP")).ok  # still usable
    finally:
        await client.logout(5.0)
    assert seed.list_uids(lab, lab_user) == uids  # nothing expunged
    assert seed.list_uids(lab, lab_user, "Trash") == []  # nothing copied


# ---------------------------------------------------------------- failures mid-stream


async def _cutting_proxy(lab: LabDovecot, cut_after: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Relay to the lab's imaps port, dropping both sides once ``cut_after`` bytes came back."""

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(lab.host, lab.ports["imaps"]) as server:
            async def up() -> None:
                while data := await client.receive_some(65536):
                    await server.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(up)
                sent = 0
                while sent < cut_after and (data := await server.receive_some(65536)):
                    await client.send_all(data)
                    sent += len(data)
                nursery.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_upstream_dropping_mid_literal(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str,
                                             nursery: trio.Nursery) -> None:
    size = 3 * 1024 * 1024
    uid = seed.append(lab, lab_user, big_message_chunks(size), size=size)
    port = await nursery.start(_cutting_proxy, lab, 1024 * 1024)
    provider = lab_provider(lab, oauth_server).model_copy(update={"imap": f"127.0.0.1:{port}"})
    client = await open_upstream(LabAccount(oauth_server, lab_user, provider), LIMITS)
    got = 0
    try:
        await client.select("INBOX")
        with pytest.raises(UpstreamError, match="lost|closed"):
            async with client.stream_body(uid) as body:
                async for chunk in body:
                    got += len(chunk)
        assert 0 < got < size
        with pytest.raises(UpstreamError):  # unusable afterwards
            await client.command(b"NOOP")
    finally:
        await client.aclose()


async def test_detach_hands_over_stream_and_releases_slot(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                          lab_user: str) -> None:
    from gateway.upstream.slots import UpstreamSlots

    account = LabAccount(oauth_server, lab_user, lab_provider(lab, oauth_server))
    slots = UpstreamSlots(lab_user, capacity=1, wait=0)
    client = await open_upstream(account, LIMITS, slots=slots)
    assert slots.in_use == 1
    stream, buffered = client.detach()
    assert buffered == b""
    await stream.send_all(b"x1 NOOP\r\n")
    answer = b""
    while not answer.endswith(b"\r\n") or b"x1 " not in answer:
        answer += await stream.receive_some(4096)
    assert b"x1 OK" in answer
    await stream.aclose()
    assert slots.in_use == 0
    client2 = await open_upstream(account, LIMITS, slots=slots)
    assert slots.in_use == 1
    await client2.logout(5.0)
    assert slots.in_use == 0


async def test_server_bye_and_kick_become_upstream_error(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                         lab_user: str) -> None:
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        await trio.to_thread.run_sync(lab.kill_connections, lab_user)
        with pytest.raises(UpstreamError, match="closed|lost") as info:
            for _ in range(50):  # the kick lands asynchronously
                await client.command(b"NOOP")
                await trio.sleep(0.05)
        assert "BYE" in str(info.value)
    finally:
        await client.aclose()


async def test_partial_fetch_past_the_end_is_empty(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                   lab_user: str) -> None:
    uid = seed.append(lab, lab_user, CORPUS["simple"])
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        async with client.stream_body(uid, partial=(10_000, 100)) as body:
            assert [c async for c in body] == []
        assert body.size == 0
    finally:
        await client.logout(5.0)


async def test_cancelled_command_makes_connection_unusable(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                           lab_user: str) -> None:
    size = 2 * 1024 * 1024
    uid = seed.append(lab, lab_user, big_message_chunks(size), size=size)
    client = await login(lab, oauth_server, lab_user)
    try:
        await client.select("INBOX")
        with trio.CancelScope() as scope:
            async with client.stream_body(uid) as body:
                async for _ in body:
                    scope.cancel()  # the caller's deadline strikes mid-body
                    await trio.sleep(0)
        assert scope.cancelled_caught
        with pytest.raises(UpstreamError, match="unusable"):
            await client.command(b"NOOP")
    finally:
        await client.logout(5.0)
