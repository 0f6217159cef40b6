"""The test lab itself: real Dovecot + local OAuth server + seeding, proven over the wire."""

from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.lab import INSTALL_HINT, DovecotNotInstalled, LabDovecot, LabOAuthServer, seed
from tests.lab.corpus import CORPUS, big_message_chunks, big_message_sha256, crlf_normalise
from tests.lab.oauth_server import GRANT_DEVICE_CODE, GRANT_JWT_BEARER, pkce_challenge

# What Dovecot 2.3.19 sends after a refused token: the base64 of {"status":"401","schemes":"bearer",
# "scope":"mail"} for XOAUTH2 and of {"status":"invalid_token"} for OAUTHBEARER (RFC 7628 §3.2.2).
XOAUTH2_FAILURE_CHALLENGE = b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="
OAUTHBEARER_FAILURE_CHALLENGE = b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0="
IMAP_AUTH_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed."
POP3_AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
REDIRECT_URI = "http://127.0.0.1:9/callback"
HTTP_TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ SASL helpers


def xoauth2(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer(user: str, token: str, port: int) -> bytes:
    gs2 = f"n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(gs2.encode())


class Wire:
    """A raw TLS connection to one lab port, for byte-level assertions."""

    def __init__(self, lab: LabDovecot, port_name: str) -> None:
        self.sock = seed.connect_tls(lab, port_name)
        self.reader = seed.LineReader(self.sock)
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data + b"\r\n")

    def line(self) -> bytes:
        return self.reader.line().rstrip(b"\r\n")

    def tagged(self, tag: bytes) -> bytes:
        while not (line := self.line()).startswith(tag + b" "):
            pass
        return line[len(tag) + 1:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def imaps(lab: LabDovecot) -> Iterator[Wire]:
    wire = Wire(lab, "imaps")
    yield wire
    wire.close()


@pytest.fixture
def pop3s(lab: LabDovecot) -> Iterator[Wire]:
    wire = Wire(lab, "pop3s")
    yield wire
    wire.close()


# ------------------------------------------------------------------ Dovecot + OAuth


def test_imap_xoauth2_fresh_token_logs_in(lab, oauth_server, lab_user, imaps):
    access, _ = oauth_server.issue_tokens(lab_user)
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, access))
    assert imaps.tagged(b"a").startswith(b"OK")
    imaps.send(b"b SELECT INBOX")
    assert imaps.tagged(b"b").startswith(b"OK [READ-WRITE]")


@pytest.mark.parametrize("spoil", ["revoke", "expire"])
def test_imap_xoauth2_bad_token_wire(lab, oauth_server, lab_user, imaps, spoil):
    access, _ = oauth_server.issue_tokens(lab_user)
    getattr(oauth_server, spoil)(access)
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, access))
    challenge = imaps.line()
    assert challenge == XOAUTH2_FAILURE_CHALLENGE
    assert json.loads(base64.b64decode(challenge[2:])) == {
        "status": "401", "schemes": "bearer", "scope": "mail"}
    imaps.send(b"")
    assert imaps.tagged(b"a") == IMAP_AUTH_FAILED


def test_imap_xoauth2_token_of_another_user_fails(lab, oauth_server, lab_user, imaps):
    access, _ = oauth_server.issue_tokens(lab.new_user())
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, access))
    assert imaps.line() == XOAUTH2_FAILURE_CHALLENGE
    imaps.send(b"")
    assert imaps.tagged(b"a") == IMAP_AUTH_FAILED


def test_imap_oauthbearer_fresh_token_logs_in(lab, oauth_server, lab_user, imaps):
    access, _ = oauth_server.issue_tokens(lab_user)
    imaps.send(b"a AUTHENTICATE OAUTHBEARER "
               + oauthbearer(lab_user, access, lab.ports["imaps"]))
    assert imaps.tagged(b"a").startswith(b"OK")


@pytest.mark.parametrize("spoil", ["revoke", "expire"])
def test_imap_oauthbearer_bad_token_wire(lab, oauth_server, lab_user, imaps, spoil):
    access, _ = oauth_server.issue_tokens(lab_user)
    getattr(oauth_server, spoil)(access)
    imaps.send(b"a AUTHENTICATE OAUTHBEARER "
               + oauthbearer(lab_user, access, lab.ports["imaps"]))
    assert imaps.line() == OAUTHBEARER_FAILURE_CHALLENGE
    imaps.send(b"AQ==")
    assert imaps.tagged(b"a") == IMAP_AUTH_FAILED


def test_pop3_xoauth2_fresh_token_logs_in(lab, oauth_server, lab_user, pop3s):
    access, _ = oauth_server.issue_tokens(lab_user)
    pop3s.send(b"AUTH XOAUTH2 " + xoauth2(lab_user, access))
    assert pop3s.line().startswith(b"+OK")
    pop3s.send(b"STAT")
    assert pop3s.line() == b"+OK 0 0"


@pytest.mark.parametrize("spoil", ["revoke", "expire"])
def test_pop3_xoauth2_bad_token_wire(lab, oauth_server, lab_user, pop3s, spoil):
    access, _ = oauth_server.issue_tokens(lab_user)
    getattr(oauth_server, spoil)(access)
    pop3s.send(b"AUTH XOAUTH2 " + xoauth2(lab_user, access))
    assert pop3s.line() == XOAUTH2_FAILURE_CHALLENGE
    pop3s.send(b"")
    assert pop3s.line() == POP3_AUTH_FAILED


def test_introspection_outage_is_a_temporary_failure(lab, oauth_server, lab_user, imaps):
    access, _ = oauth_server.issue_tokens(lab_user)
    oauth_server.introspection_fail_mode = ("status", 503)
    try:
        imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, access))
        # Dovecot appends " [hostname:timestamp]" to temporary failures.
        assert imaps.tagged(b"a").startswith(b"NO [UNAVAILABLE] Temporary authentication failure.")
    finally:
        oauth_server.introspection_fail_mode = None


def test_static_password_login_for_direct_access(lab, lab_user, imaps):
    imaps.send(b'a LOGIN "%s" "%s"' % (lab_user.encode(), lab.password.encode()))
    assert imaps.tagged(b"a").startswith(b"OK")
    imaps.send(b"b LIST \"\" \"*\"")
    listing = []
    while not (line := imaps.line()).startswith(b"b "):
        listing.append(line)
    assert b'* LIST (\\HasNoChildren \\Trash) "/" Trash' in listing


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
def test_starttls_and_stls_verify_against_the_lab_ca(lab, lab_user, server_name):
    context = seed.client_ssl_context(lab)
    with imaplib.IMAP4(server_name, lab.ports["imap"], timeout=HTTP_TIMEOUT) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=context)
        assert imap.login(lab_user, lab.password)[0] == "OK"
    pop = poplib.POP3(server_name, lab.ports["pop3"], timeout=HTTP_TIMEOUT)
    try:
        assert "STLS" in pop.capa()
        pop.stls(context=context)
        pop.user(lab_user)
        assert pop.pass_(lab.password).startswith(b"+OK")
    finally:
        pop.quit()


# ------------------------------------------------------------------ OAuth server over HTTP


@pytest.fixture
def http(oauth_server) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        yield client


def _client_form(server: LabOAuthServer, **fields: str) -> dict[str, str]:
    assert server.client_secret is not None
    return {"client_id": server.client_id, "client_secret": server.client_secret, **fields}


def _authorize(http: httpx.Client, server: LabOAuthServer, user: str, verifier: str) -> str:
    answer = http.get(server.authorize_url, params={
        "response_type": "code", "client_id": server.client_id, "redirect_uri": REDIRECT_URI,
        "state": "st4te", "scope": "mail", "login_hint": user,
        "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256",
    })
    assert answer.status_code == 302
    location = urllib.parse.urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    query = dict(urllib.parse.parse_qsl(location.query))
    assert query["state"] == "st4te"
    return query["code"]


def test_authorization_code_with_pkce(lab, oauth_server, lab_user, http, imaps):
    verifier = secrets.token_urlsafe(48)
    code = _authorize(http, oauth_server, lab_user, verifier)
    answer = http.post(oauth_server.token_url, data=_client_form(
        oauth_server, grant_type="authorization_code", code=code,
        redirect_uri=REDIRECT_URI, code_verifier=verifier))
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert tokens["token_type"] == "Bearer" and tokens["refresh_token"]
    assert tokens["expires_in"] == oauth_server.access_token_lifetime
    # The token is good for the user it was authorized for.
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, tokens["access_token"]))
    assert imaps.tagged(b"a").startswith(b"OK")
    # Codes are single use.
    again = http.post(oauth_server.token_url, data=_client_form(
        oauth_server, grant_type="authorization_code", code=code,
        redirect_uri=REDIRECT_URI, code_verifier=verifier))
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_authorization_code_wrong_verifier_is_rejected(oauth_server, http):
    code = _authorize(http, oauth_server, "bob@example.com", secrets.token_urlsafe(48))
    answer = http.post(oauth_server.token_url, data=_client_form(
        oauth_server, grant_type="authorization_code", code=code,
        redirect_uri=REDIRECT_URI, code_verifier=secrets.token_urlsafe(48)))
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"
    assert "error_description" in answer.json()


def test_authorization_code_with_basic_auth_and_wrong_redirect(oauth_server, http):
    verifier = secrets.token_urlsafe(48)
    code = _authorize(http, oauth_server, "bob@example.com", verifier)
    wrong = http.post(oauth_server.token_url, auth=(oauth_server.client_id, "nope"), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    code = _authorize(http, oauth_server, "bob@example.com", verifier)
    mismatch = http.post(oauth_server.token_url, auth=(oauth_server.client_id,
                                                       oauth_server.client_secret), data={
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": REDIRECT_URI + "x", "code_verifier": verifier})
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "invalid_grant"


def test_refresh_with_and_without_rotation(oauth_server, http):
    _, refresh = oauth_server.issue_tokens("carol@example.com")
    plain = http.post(oauth_server.token_url, data=_client_form(
        oauth_server, grant_type="refresh_token", refresh_token=refresh)).json()
    assert oauth_server.is_active(plain["access_token"]) and "refresh_token" not in plain
    oauth_server.rotate_refresh_tokens = True
    try:
        rotated = http.post(oauth_server.token_url, data=_client_form(
            oauth_server, grant_type="refresh_token", refresh_token=refresh)).json()
        assert rotated["refresh_token"] != refresh
        old = http.post(oauth_server.token_url, data=_client_form(
            oauth_server, grant_type="refresh_token", refresh_token=refresh))
        assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
        new = http.post(oauth_server.token_url, data=_client_form(
            oauth_server, grant_type="refresh_token", refresh_token=rotated["refresh_token"]))
        assert new.status_code == 200
    finally:
        oauth_server.rotate_refresh_tokens = False


def test_revoked_refresh_token_is_invalid_grant(oauth_server, http):
    _, refresh = oauth_server.issue_tokens("dave@example.com")
    oauth_server.revoke(refresh)
    answer = http.post(oauth_server.token_url, data=_client_form(
        oauth_server, grant_type="refresh_token", refresh_token=refresh))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def _start_device(http: httpx.Client, server: LabOAuthServer) -> tuple[dict, dict]:
    start = http.post(server.device_url, data={"client_id": server.client_id,
                                               "scope": "mail"}).json()
    poll = {"client_id": server.client_id, "grant_type": GRANT_DEVICE_CODE,
            "device_code": start["device_code"]}
    return start, poll


def test_device_flow_pending_approve_success(lab, oauth_server, lab_user, http, pop3s):
    start, poll = _start_device(http, oauth_server)
    assert start["verification_uri"] == oauth_server.verification_url
    assert start["interval"] == oauth_server.device_interval and start["expires_in"] > 0
    first = http.post(oauth_server.token_url, data=poll)
    assert first.status_code == 400 and first.json()["error"] == "authorization_pending"
    oauth_server.approve_device(start["user_code"], lab_user)
    time.sleep(start["interval"])  # a well-behaved client waits the interval
    done = http.post(oauth_server.token_url, data=poll)
    assert done.status_code == 200, done.text
    tokens = done.json()
    assert tokens["refresh_token"]
    pop3s.send(b"AUTH XOAUTH2 " + xoauth2(lab_user, tokens["access_token"]))
    assert pop3s.line().startswith(b"+OK")
    reused = http.post(oauth_server.token_url, data=poll)
    assert reused.json()["error"] == "invalid_grant"


def test_device_flow_polling_too_fast_is_slow_down(oauth_server, http):
    _, poll = _start_device(http, oauth_server)
    assert http.post(oauth_server.token_url, data=poll).json()["error"] == "authorization_pending"
    too_fast = http.post(oauth_server.token_url, data=poll)
    assert too_fast.status_code == 400 and too_fast.json()["error"] == "slow_down"


def test_device_flow_denied_and_expired(oauth_server, http):
    start = http.post(oauth_server.device_url, data={"client_id": oauth_server.client_id}).json()
    oauth_server.deny_device(start["user_code"])
    denied = http.post(oauth_server.token_url, data={
        "client_id": oauth_server.client_id, "grant_type": GRANT_DEVICE_CODE,
        "device_code": start["device_code"]})
    assert denied.json()["error"] == "access_denied"
    lifetime = oauth_server.device_code_lifetime
    oauth_server.device_code_lifetime = 0
    try:
        start = http.post(oauth_server.device_url,
                          data={"client_id": oauth_server.client_id}).json()
    finally:
        oauth_server.device_code_lifetime = lifetime
    expired = http.post(oauth_server.token_url, data={
        "client_id": oauth_server.client_id, "grant_type": GRANT_DEVICE_CODE,
        "device_code": start["device_code"]})
    assert expired.json()["error"] == "expired_token"


def test_client_credentials(lab, oauth_server, lab_user, http, imaps):
    previous = oauth_server.client_credentials_user
    oauth_server.client_credentials_user = lab_user
    try:
        answer = http.post(oauth_server.token_url, data=_client_form(
            oauth_server, grant_type="client_credentials", scope="https://x/.default"))
    finally:
        oauth_server.client_credentials_user = previous
    assert answer.status_code == 200
    tokens = answer.json()
    assert "refresh_token" not in tokens and tokens["scope"] == "https://x/.default"
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, tokens["access_token"]))
    assert imaps.tagged(b"a").startswith(b"OK")
    bad = http.post(oauth_server.token_url, data={
        "grant_type": "client_credentials", "client_id": oauth_server.client_id})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"


def _jwt(key: rsa.RSAPrivateKey, claims: dict[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64(signature)}"


def test_jwt_bearer_good_and_bad(lab, oauth_server, lab_user, http, imaps):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    iss = f"svc-{secrets.token_hex(4)}@lab.iam.example.com"
    oauth_server.register_jwt_issuer(iss, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    claims = {"iss": iss, "sub": lab_user, "scope": "mail", "aud": oauth_server.token_url,
              "iat": now, "exp": now + 3600}

    def grant(assertion: str) -> httpx.Response:
        return http.post(oauth_server.token_url, data={
            "grant_type": GRANT_JWT_BEARER, "assertion": assertion})

    good = grant(_jwt(key, claims))
    assert good.status_code == 200, good.text
    imaps.send(b"a AUTHENTICATE XOAUTH2 " + xoauth2(lab_user, good.json()["access_token"]))
    assert imaps.tagged(b"a").startswith(b"OK")
    for bad in (_jwt(impostor, claims),
                _jwt(key, {**claims, "aud": "https://elsewhere/token"}),
                _jwt(key, {**claims, "exp": now - 10, "iat": now - 100}),
                _jwt(key, {**claims, "exp": now + 7200}),
                "not.a.jwt"):
        answer = grant(bad)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_token_fail_modes_and_request_log(oauth_server, http):
    _, refresh = oauth_server.issue_tokens("erin@example.com")
    form = _client_form(oauth_server, grant_type="refresh_token", refresh_token=refresh)
    before = len(oauth_server.token_requests)
    try:
        oauth_server.fail_mode = ("status", 503)
        answer = http.post(oauth_server.token_url, data=form)
        assert answer.status_code == 503
        assert answer.json()["error"] == "temporarily_unavailable"
        oauth_server.fail_mode = ("malformed",)
        with pytest.raises(json.JSONDecodeError):
            http.post(oauth_server.token_url, data=form).json()
        oauth_server.fail_mode = ("hang", 30)
        with pytest.raises(httpx.ReadTimeout):
            http.post(oauth_server.token_url, data=form, timeout=0.3)
        # Introspection keeps answering during a token-endpoint outage.
        introspected = http.post(oauth_server.introspect_url, data={"token": "unknown"})
        assert introspected.json() == {"active": False}
    finally:
        oauth_server.fail_mode = None
    assert http.post(oauth_server.token_url, data=form).status_code == 200
    log = oauth_server.token_requests[before:]
    assert [r["status"] for r in log] == [503, 0, 0, 200]
    assert {r["grant_type"] for r in log} == {"refresh_token"}
    assert all(r["client_id"] == oauth_server.client_id for r in log)


def test_introspection_and_secret_inventory(oauth_server, http):
    access, refresh = oauth_server.issue_tokens("frank@example.com", scope="mail extra")
    answer = http.post(oauth_server.introspect_url, data={"token": access}).json()
    assert answer["active"] is True and answer["username"] == "frank@example.com"
    assert answer["scope"] == "mail extra" and answer["exp"] > time.time()
    oauth_server.expire(access)
    assert http.post(oauth_server.introspect_url, data={"token": access}).json() == {
        "active": False}
    assert {access, refresh} <= set(oauth_server.all_secrets())


def test_stop_closes_keep_alive_connections():
    import socket

    server = LabOAuthServer().start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(b"POST /introspect HTTP/1.1\r\nHost: lab\r\nContent-Length: 7\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken=x")
        answer = b""
        while not answer.endswith(b'{"active": false}'):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        server.stop()
        assert sock.recv(4096) == b""  # closed by the server, not left to a thread


def test_reset_settings_undoes_test_switches(oauth_server):
    oauth_server.fail_mode = ("status", 500)
    oauth_server.introspection_fail_mode = ("status", 500)
    oauth_server.rotate_refresh_tokens = True
    oauth_server.access_token_lifetime = 5
    oauth_server.reset_settings()
    assert oauth_server.fail_mode is None and oauth_server.introspection_fail_mode is None
    assert oauth_server.rotate_refresh_tokens is False
    assert oauth_server.access_token_lifetime == 3600


def test_kill_connections_disconnects_the_user(lab, lab_user, imaps):
    imaps.send(b'a LOGIN "%s" "%s"' % (lab_user.encode(), lab.password.encode()))
    assert imaps.tagged(b"a").startswith(b"OK")
    assert lab.kill_connections(lab_user) is True
    assert imaps.line().startswith(b"* BYE")
    with pytest.raises(OSError):  # EOF (ConnectionError) or a TLS-level error
        imaps.line()
    assert lab.kill_connections(lab.new_user()) is False


# ------------------------------------------------------------------ seeding and corpus


def test_every_corpus_message_round_trips(lab, lab_user):
    with seed.imap_session(lab, lab_user) as imap:
        uids = {name: imap.append([raw], len(raw)) for name, raw in CORPUS.items()}
        imap.select()
        for name, raw in CORPUS.items():
            assert imap.fetch_literal(uids[name]) == crlf_normalise(raw), name
    assert seed.list_uids(lab, lab_user) == sorted(uids.values())


def test_one_shot_helpers_round_trip(lab, lab_user):
    raw = CORPUS["mixed_line_endings"]
    uid = seed.append(lab, lab_user, raw)
    assert seed.fetch_raw(lab, lab_user, uid) == crlf_normalise(raw)


def test_dovecot_serves_bare_lf_as_crlf(lab, lab_user):
    uid = seed.append(lab, lab_user, CORPUS["bare_lf"])
    served = seed.fetch_raw(lab, lab_user, uid)
    assert b"\n" in CORPUS["bare_lf"].replace(b"\r\n", b"")
    assert served.count(b"\n") == served.count(b"\r\n") == CORPUS["bare_lf"].count(b"\n")


def test_pop3_reference_matches_corpus(lab, lab_user):
    names = ["dot_lines", "single_dot_line", "no_final_newline", "long_line", "bare_lf"]
    for name in names:
        seed.append(lab, lab_user, CORPUS[name])
    listing = seed.pop3_list_direct(lab, lab_user)
    assert [n for n, _ in listing] == list(range(1, len(names) + 1))
    for (n, size), name in zip(listing, names, strict=True):
        expected = crlf_normalise(CORPUS[name])
        assert size == len(expected), name
        if not expected.endswith(b"\r\n"):
            expected += b"\r\n"  # RETR always ends with CRLF
        assert seed.pop3_retr_direct(lab, lab_user, n) == expected, name
    wire = seed.pop3_retr_direct(lab, lab_user, 2, wire=True)
    assert b"\r\n..\r\n" in wire and wire.endswith(b"\r\n.\r\n")
    uidl = seed.pop3_uidl_direct(lab, lab_user)
    assert len({u for _, u in uidl}) == len(names)
    assert all(len(u) == 16 for _, u in uidl)  # %08Xu%08Xv


def test_flags_and_special_use_mailboxes(lab, lab_user):
    uid = seed.append(lab, lab_user, CORPUS["simple"], flags=["\\Seen"])
    assert seed.flags(lab, lab_user, uid) == {"\\Seen"}
    seed.set_flags(lab, lab_user, uid, ["\\Flagged"], op="+FLAGS")
    assert seed.flags(lab, lab_user, uid) == {"\\Seen", "\\Flagged"}
    seed.set_flags(lab, lab_user, uid, [])
    assert seed.flags(lab, lab_user, uid) == set()
    trash_uid = seed.append(lab, lab_user, CORPUS["simple"], mailbox="Trash")
    assert seed.list_uids(lab, lab_user, "Trash") == [trash_uid]


def test_big_message_streams_in_and_out(lab, lab_user):
    size = 3 * 1024 * 1024 + 17
    uid = seed.append(lab, lab_user, big_message_chunks(size), size=size)
    served = seed.fetch_raw(lab, lab_user, uid)
    assert len(served) == size
    import hashlib

    assert hashlib.sha256(served).hexdigest() == big_message_sha256(size)


def test_big_message_is_exact_and_deterministic():
    for size in (600, 1000, 4096, 100_003):
        chunks = list(big_message_chunks(size))
        assert sum(map(len, chunks)) == size
        assert b"".join(chunks) == b"".join(big_message_chunks(size))
    assert big_message_sha256(5000, seed=1) != big_message_sha256(5000, seed=2)


def test_users_are_unique(lab):
    assert len({lab.new_user() for _ in range(100)}) == 100


# ------------------------------------------------------------------ lifecycle


def test_missing_dovecot_gives_install_hint(oauth_server):
    with pytest.raises(DovecotNotInstalled, match="apt-get install dovecot-imapd dovecot-pop3d"):
        LabDovecot(oauth_server, binary="dovecot-not-installed-here").start()
    assert "dovecot-imapd dovecot-pop3d" in INSTALL_HINT


def _group_alive(pgid: int) -> bool:
    from tests.lab.dovecot import _live_group_members

    return bool(_live_group_members(pgid))


def test_stop_leaves_no_processes(oauth_server):
    dovecot = LabDovecot(oauth_server).start()
    directory = dovecot.dir
    assert dovecot._process is not None
    pgid = dovecot._process.pid
    with seed.imap_session(dovecot, dovecot.new_user()) as imap:
        imap.select()  # a logged-in mail process exists now
        assert _group_alive(pgid)
        dovecot.stop()
    assert not _group_alive(pgid)
    assert not directory.exists()
    dovecot.stop()  # idempotent


def test_standalone_lab_writes_lab_json_and_stops_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "tests.lab", "--dir", str(tmp_path)],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline() if process.stdout else ""
        assert ready.startswith("lab ready"), ready
        info = json.loads((tmp_path / "lab.json").read_text())
        assert oct((tmp_path / "lab.json").stat().st_mode & 0o777) == "0o600"
        assert info["demo_user"] == "demo@example.com"
        assert set(info["ports"]) == {"imap", "imaps", "pop3", "pop3s", "submission", "submissions"}
        demo = _LabView(info)
        assert len(seed.list_uids(demo, "demo@example.com")) == 5
        with httpx.Client(timeout=HTTP_TIMEOUT) as http:
            refreshed = http.post(info["oauth"]["token_url"], data={
                "grant_type": "refresh_token", "refresh_token": info["demo_refresh_token"],
                "client_id": info["oauth"]["client_id"],
                "client_secret": info["oauth"]["client_secret"]})
        assert refreshed.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert not (tmp_path / "lab.json").exists()
        assert not _pids_using(tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


class _LabView:
    """The connection facts of a standalone lab, from its lab.json."""

    def __init__(self, info: dict[str, object]) -> None:
        self.host = str(info["imap_host"])
        self.ports = dict(info["ports"])  # type: ignore[call-overload]
        self.password = str(info["password"])
        self.ca_file = Path(str(info["ca_file"]))


def _pids_using(directory: Path) -> list[int]:
    marker = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# ------------------------------------------------------------------ properties


_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(_LINE, max_size=20))
def test_unstuff_inverts_pop3_dot_stuffing(lines):
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"
    assert seed.unstuff(wire) == b"".join(line + b"\r\n" for line in lines)


@given(st.binary(max_size=200))
def test_crlf_normalise_leaves_no_bare_lf(raw):
    served = crlf_normalise(raw)
    assert served.count(b"\n") == served.count(b"\r\n") == raw.count(b"\n")
    assert served.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


@settings(max_examples=50)
@given(st.integers(min_value=600, max_value=300_000), st.integers(min_value=0, max_value=3))
def test_big_message_has_exactly_the_requested_size(size, seed_value):
    message = big_message_chunks(size, seed_value)
    assert sum(map(len, message)) == size
