"""The lab's SMTP submission server (Dovecot submission + the SMTP sink) behaves as the SMTP
tests assume: it checks XOAUTH2/OAUTHBEARER tokens against the lab OAuth server, relays what it
accepts to the sink, and refuses scripted recipients per recipient."""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Iterator

import pytest

from gateway.protocol import sasl
from tests.lab import LabDovecot, LabOAuthServer

pytestmark = pytest.mark.lab


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(sasl.xoauth2_initial_response(user, token)).decode()


@pytest.fixture
def submissions(lab: LabDovecot) -> Iterator[smtplib.SMTP_SSL]:
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    client = smtplib.SMTP_SSL(lab.host, lab.ports["submissions"], context=ctx, timeout=10)
    try:
        client.ehlo("test")
        yield client
    finally:
        client.close()


def strip_trace(data: bytes) -> bytes:
    """The message without the ``Received:`` header Dovecot puts on top."""
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith((b"\t", b" ")):
        i += 1
    return b"\r\n".join(lines[i:])


def test_ehlo_offers_what_the_front_end_relays(submissions: smtplib.SMTP_SSL) -> None:
    for ext in ("auth", "size", "8bitmime", "pipelining", "enhancedstatuscodes", "chunking"):
        assert submissions.has_extn(ext), ext
    assert {"XOAUTH2", "OAUTHBEARER"} <= set(submissions.esmtp_features["auth"].upper().split())


def test_xoauth2_submission_reaches_the_sink(lab: LabDovecot, oauth_server: LabOAuthServer,
                                             lab_user: str, submissions: smtplib.SMTP_SSL) -> None:
    access, _ = oauth_server.issue_tokens(lab_user)
    assert submissions.docmd("AUTH", "XOAUTH2 " + xoauth2(lab_user, access))[0] == 235
    body = b"Subject: lab\r\n\r\n.a dot line\r\n8-bit \xe9\r\n"  # sendmail() stuffs it
    refused = submissions.sendmail(lab_user, ["rcpt@example.net", "refuse7@example.net"], body)
    assert refused == {"refuse7@example.net": (550, b"5.0.0 <refuse7@example.net> 5.1.1 "
                                                    b"<refuse7@example.net>: Recipient address rejected")}
    assert lab.sink is not None
    [stored] = lab.sink.wait_for("rcpt@example.net")
    assert stored.mail_from == lab_user
    assert stored.rcpt_tos == ("rcpt@example.net",)
    assert strip_trace(stored.data) == body


def test_oauthbearer_accepted(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str,
                              submissions: smtplib.SMTP_SSL) -> None:
    access, _ = oauth_server.issue_tokens(lab_user)
    message = sasl.oauthbearer_initial_response(lab_user, access, lab.host, lab.ports["submissions"])
    code, _ = submissions.docmd("AUTH", "OAUTHBEARER " + base64.b64encode(message).decode())
    assert code == 235


def test_revoked_token_gets_json_challenge_then_535(oauth_server: LabOAuthServer, lab_user: str,
                                                    submissions: smtplib.SMTP_SSL) -> None:
    access, _ = oauth_server.issue_tokens(lab_user)
    oauth_server.revoke(access)
    code, challenge = submissions.docmd("AUTH", "XOAUTH2 " + xoauth2(lab_user, access))
    assert code == 334
    assert sasl.decode_oauth_error(challenge).token_rejected
    code, text = submissions.docmd("")
    assert (code, text) == (535, b"5.7.8 Authentication failed.")


def test_unauthenticated_mail_is_refused(lab_user: str, submissions: smtplib.SMTP_SSL) -> None:
    code, _ = submissions.docmd(f"MAIL FROM:<{lab_user}>")
    assert code == 530
