"""mailgate's own IMAP dialogue before login, through a real gateway with real TLS."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import trio

from tests.fixtures.gateway import lab_provider, make_config, start_gateway
from tests.fixtures.imap import Gate, Wire, caps_of, quoted, start_seeded_gate
from tests.lab import LabDovecot, LabOAuthServer

pytestmark = pytest.mark.lab


async def test_implicit_tls_greeting_and_capability(gate: Gate) -> None:
    w = await gate.wire("imaps")
    greeting = await w.line()
    assert greeting.startswith(b"* OK [CAPABILITY ") and greeting.endswith(b"\r\n")
    caps = caps_of(greeting)
    assert {"IMAP4rev1", "AUTH=PLAIN", "SASL-IR", "LITERAL+", "ID"} <= caps
    assert not caps & {"STARTTLS", "LOGINDISABLED"}
    lines = await w.command(b"c1 CAPABILITY")
    assert caps_of(lines[0]) == caps
    assert lines[-1] == b"c1 OK Capability completed.\r\n"
    assert await w.command(b"n1 noop") == [b"n1 OK NOOP completed.\r\n"]
    lines = await w.command(b'i1 ID ("name" "test" "version" NIL)')
    assert lines[0].startswith(b'* ID ("name" "mailgate" "version" ')
    assert await w.command(b"l1 LOGOUT") == [b"* BYE Logging out.\r\n", b"l1 OK Logout completed.\r\n"]
    assert await w.eof()


async def test_starttls_listener(gate: Gate) -> None:
    w = await gate.wire("starttls")
    caps = caps_of(await w.line())
    assert {"STARTTLS", "LOGINDISABLED"} <= caps
    assert not any(c.startswith("AUTH=") for c in caps)
    assert await w.command(b"a LOGIN alice pw") == [
        b"a NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS: use STARTTLS.\r\n"
    ]
    # A command pipelined after STARTTLS in the same packet must never be executed.
    await w.send(b"s STARTTLS\r\nx LOGOUT\r\n")
    assert await w.line() == b"s OK Begin TLS negotiation now.\r\n"
    await w.start_tls()
    lines = await w.command(b"c CAPABILITY")
    caps = caps_of(lines[0])
    assert "AUTH=PLAIN" in caps and not caps & {"STARTTLS", "LOGINDISABLED"}
    assert await w.command(b"s2 STARTTLS") == [b"s2 BAD TLS is already active.\r\n"]
    await w.aclose()


async def test_cleartext_listener_allows_login_from_trusted_network(gate: Gate) -> None:
    w = await gate.wire("plain")
    caps = caps_of(await w.line())
    assert "AUTH=PLAIN" in caps and not caps & {"STARTTLS", "LOGINDISABLED"}
    await w.aclose()


async def test_listener_without_tls_refuses_passwords_without_pointing_to_starttls(
    nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
) -> None:
    """``tls = "none"`` without ``plaintext_auth_from``: LOGINDISABLED, and the refusal must not
    tell the client to use STARTTLS, which this listener does not offer."""
    config = make_config(tmp_path, {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": [{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none"}],
        "admin": {"enabled": False},
        "providers": {"lab": lab_provider(lab, oauth_server)},
        "users": {"alice": {"provider": "lab", "upstream_user": lab.new_user("notls")}},
    })
    server = await start_gateway(nursery, config)
    w = Wire(await trio.open_tcp_stream(*server.addresses[0]), ssl.create_default_context())  # never used
    caps = caps_of(await w.line())
    assert "LOGINDISABLED" in caps and "STARTTLS" not in caps
    refused = b" NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS: this port offers no TLS.\r\n"
    assert await w.command(b"a LOGIN alice pw") == [b"a" + refused]
    plain = base64.b64encode(b"\0alice\0pw")
    assert await w.command(b"b AUTHENTICATE PLAIN " + plain) == [b"b" + refused]
    assert await w.command(b"s STARTTLS") == [b"s BAD STARTTLS is not offered here.\r\n"]
    await w.aclose()


async def test_wrong_password_and_unknown_user_get_the_same_answer(gate: Gate) -> None:
    w = await gate.wire("imaps")
    await w.line()
    a = await w.command(b'a LOGIN alice "wrong password"')
    b = await w.command(b"b LOGIN mallory " + quoted(gate.password))
    assert a == [b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    assert b == [b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    # The third failure ends the connection.
    plain = base64.b64encode(b"\0alice\0nope")
    assert await w.command(b"c AUTHENTICATE PLAIN " + plain) == [
        b"c NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    ]
    assert await w.line() == b"* BYE Too many failed logins.\r\n"
    assert await w.eof()


async def test_bad_commands_end_the_connection(gate: Gate) -> None:
    w = await gate.wire("imaps")
    await w.line()
    assert await w.command(b"a SELECT INBOX") == [b"a BAD Log in first: SELECT.\r\n"]
    assert await w.command(b'b LOGIN "unterminated') == [b"b BAD Unterminated or badly escaped quoted string.\r\n"]
    await w.send(b"\r\n")
    assert await w.line() == b"* BAD Missing or invalid tag.\r\n"
    assert await w.line() == b"* BYE Too many invalid commands.\r\n"
    assert await w.eof()


async def test_authenticate_cancel_and_unknown_mechanism(gate: Gate) -> None:
    w = await gate.wire("imaps")
    await w.line()
    await w.send(b"a AUTHENTICATE PLAIN\r\n")
    assert await w.line() == b"+ \r\n"
    await w.send(b"*\r\n")
    assert await w.line() == b"a BAD Authentication cancelled.\r\n"
    assert await w.command(b"b AUTHENTICATE CRAM-MD5") == [
        b"b NO [CANNOT] Unsupported authentication mechanism.\r\n"
    ]
    assert await w.command(b"c AUTHENTICATE PLAIN !!notbase64") == [b"c BAD SASL message is not valid base64.\r\n"]
    await w.aclose()


async def test_overlong_line_gets_bye(gate: Gate) -> None:
    w = await gate.wire("imaps")
    await w.line()
    await w.send(b"a LOGIN " + b"x" * 9000)
    assert await w.line() == b"* BYE Command line is too long.\r\n"
    assert await w.eof()


async def test_login_timeout(nursery: trio.Nursery, tmp_path: Path, lab, oauth_server, seeded_state) -> None:
    gate = await start_seeded_gate(nursery, tmp_path, lab, oauth_server, seeded_state, login_timeout=0.5)
    w = await gate.wire("imaps")
    await w.line()
    assert await w.line() == b"* BYE Disconnected for inactivity.\r\n"
    assert await w.eof()
