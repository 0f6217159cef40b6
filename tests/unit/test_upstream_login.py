"""How upstream AUTHENTICATE failures are classified (provider quirks, no network)."""

from __future__ import annotations

import base64

import pytest

from gateway.protocol.imap_responses import ResponseFramer
from gateway.upstream.client import UpstreamBad, UpstreamNo, UpstreamResponse, quote_mailbox, uid_set
from gateway.upstream.login import AuthVerdict, classify_auth_failure


def answer(line: bytes) -> UpstreamResponse:
    [tagged] = ResponseFramer().feed(line + b"\r\n")
    return UpstreamResponse("AUTHENTICATE XOAUTH2", tagged)


DOVECOT_CHALLENGE = b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="


@pytest.mark.parametrize(
    ("line", "challenge", "verdict"),
    [
        # Dovecot / Gmail: JSON challenge, then NO
        (b"M1 NO [AUTHENTICATIONFAILED] Authentication failed.", DOVECOT_CHALLENGE, AuthVerdict.TOKEN_REJECTED),
        (b"M1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)",
         base64.b64encode(b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'),
         AuthVerdict.TOKEN_REJECTED),
        # Microsoft 365: no challenge at all
        (b"M1 NO AUTHENTICATE failed.", None, AuthVerdict.TOKEN_REJECTED),
        (b"M1 BAD User is authenticated but not connected.", None, AuthVerdict.MAILBOX_REFUSED),
        (b"M1 NO Request is throttled. Suggested Backoff Time: 2000 milliseconds", None, AuthVerdict.TEMPORARY),
        (b"M1 BAD Request is throttled. Suggested Backoff Time: 59 milliseconds", None, AuthVerdict.TEMPORARY),
        # Gmail connection limit, Dovecot's IdP outage
        (b"M1 NO [ALERT] Too many simultaneous connections. (Failure)", None, AuthVerdict.TEMPORARY),
        (b"M1 NO [ALERT] Account exceeded command or bandwidth limits. (Failure)", None, AuthVerdict.TEMPORARY),
        (b"M1 NO [UNAVAILABLE] Temporary authentication failure.", DOVECOT_CHALLENGE, AuthVerdict.TEMPORARY),
        (b"M1 NO failed", base64.b64encode(b'{"status":"503"}'), AuthVerdict.TEMPORARY),
        (b"M1 NO failed", b"not base64!", AuthVerdict.TOKEN_REJECTED),
        (b"M1 BAD Unknown command", None, AuthVerdict.PROTOCOL),
    ],
)
def test_classify(line: bytes, challenge: bytes | None, verdict: AuthVerdict) -> None:
    assert classify_auth_failure(answer(line), challenge) is verdict


def test_check_raises_typed_errors_with_backoff() -> None:
    with pytest.raises(UpstreamNo) as no:
        answer(b"M1 NO Request is throttled. Suggested Backoff Time: 1500 milliseconds").check()
    assert no.value.backoff == 1.5 and "throttled" in str(no.value)
    with pytest.raises(UpstreamBad) as bad:
        answer(b"M1 BAD [CLIENTBUG] nope").check()
    assert (bad.value.status, bad.value.code, bad.value.text) == ("BAD", "CLIENTBUG", "nope")
    assert answer(b"M1 OK fine").check().ok


def test_uid_set_and_mailbox_quoting() -> None:
    assert uid_set([7, 1, 2, 3, 9, 10]) == b"1:3,7,9:10"
    assert uid_set([5]) == b"5"
    with pytest.raises(ValueError):
        uid_set([])
    assert quote_mailbox('a "b" \\c') == b'"a \\"b\\" \\\\c"'
    assert quote_mailbox("Entwürfe") == b'"Entw&APw-rfe"'
    assert b"\r" not in quote_mailbox("a\r\nb") and b"\n" not in quote_mailbox("a\r\nb")
