"""docs/troubleshooting.md is checked against the code: every provider answer mailgate knows is in
the table, every IMAP login answer in it is classified the way the table says, every OAuth error
the way the table says, and every answer the fault suite injects has its row."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from gateway import errors
from gateway.frontends.imap_relay import UPSTREAM_ADVICE
from gateway.oauth.accounts import TEMPORARY_OAUTH_ERRORS
from gateway.protocol.imap_responses import ResponseFramer
from gateway.protocol.smtp import ReplyParser
from gateway.upstream import login
from gateway.upstream.client import UpstreamResponse
from gateway.upstream.login import AuthVerdict, classify_auth_failure
from gateway.upstream.smtp_answers import ANSWERS, Meaning, explain

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
JSON_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')


def rows() -> list[list[str]]:
    table = [line for line in DOC.splitlines() if line.startswith("| `") or line.startswith("| HTTP")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table]


def codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def tag(row: list[str]) -> str:
    return codes(row[3])[0] if codes(row[3]) else row[3].split(":")[0]


def test_the_table_is_well_formed() -> None:
    table = rows()
    assert len(table) >= 20
    for row in table:
        assert len(row) == 5, row
        assert row[1] in ("IMAP login", "IMAP session", "token endpoint", "proxy", "SMTP AUTH",
                          "SMTP message"), row


@pytest.mark.parametrize("row", [r for r in rows() if r[1] == "IMAP login"], ids=lambda r: r[0][:40])
def test_imap_login_answers_are_classified_as_the_table_says(row: list[str]) -> None:
    text = codes(row[0])[0].replace("<n>", "250")
    [tagged] = ResponseFramer().feed(b"M1 " + text.encode() + b"\r\n")
    challenge = JSON_CHALLENGE if "after a JSON challenge" in row[0] else None
    verdict = classify_auth_failure(UpstreamResponse("AUTHENTICATE XOAUTH2", tagged), challenge)
    assert verdict.value == tag(row), (text, verdict)


SMTP_ROWS = [r for r in rows() if r[1].startswith("SMTP")]


@pytest.mark.parametrize("row", SMTP_ROWS, ids=lambda r: r[0][:40])
def test_smtp_answers_are_explained_as_the_table_says(row: list[str]) -> None:
    parser = ReplyParser()
    parser.feed(codes(row[0])[0].encode() + b"\r\n")
    reply = parser.next_reply()
    assert reply is not None
    explained = explain(reply)
    assert explained is not None and explained.meaning.value == tag(row), (row[0], explained)


def test_every_smtp_answer_the_code_explains_has_a_row() -> None:
    assert {m.value for m in Meaning} <= {tag(r) for r in SMTP_ROWS}
    explained = set()
    for row in SMTP_ROWS:
        parser = ReplyParser()
        parser.feed(codes(row[0])[0].encode() + b"\r\n")
        reply = parser.next_reply()
        assert reply is not None
        found = explain(reply)
        assert found is not None
        explained.add(found.key)
    assert {answer.explanation.key for answer in ANSWERS} <= explained


def test_every_oauth_error_is_classified_as_the_table_says() -> None:
    seen = set()
    for row in rows():
        if row[1] != "token endpoint":
            continue
        for error in codes(row[0]):
            if re.fullmatch(r"[a-z_]+", error):
                seen.add(error)
                expected = "temporary" if error in TEMPORARY_OAUTH_ERRORS else "reauthorization_required"
                assert tag(row) == expected, (error, row[3])
    assert TEMPORARY_OAUTH_ERRORS <= seen and "invalid_grant" in seen


def test_every_answer_the_code_knows_is_in_the_table() -> None:
    first_column = " ".join(row[0] for row in rows()).lower()
    for phrase in login._TEMPORARY_PHRASES:
        assert phrase in first_column, phrase
    for code in login._TEMPORARY_CODES:
        assert f"[{code.lower()}]" in first_column, code
    assert login._NOT_CONNECTED in first_column
    for marker, _advice in UPSTREAM_ADVICE:
        assert marker.decode().lower() in first_column, marker
    # Every verdict and every exception a provider answer can end in has its explanation.
    for verdict in AuthVerdict:
        assert f"`{verdict.value}`" in DOC, verdict
    for name in ("AuthenticationFailed", "ReauthorizationRequired", "FeatureRefused",
                 "TemporaryFailure", "UpstreamError"):
        assert isinstance(getattr(errors, name), type) and f"`{name}`" in DOC, name


def test_every_answer_the_fault_suite_injects_has_its_row() -> None:
    patterns = []
    for row in rows():
        for text in codes(row[0])[:1]:
            regex = re.escape(text).replace("<n>", r"\d+").replace("H:P", r"\S+").replace(r"\.\.\.", ".*")
            patterns.append(re.compile(regex))
    injected: set[str] = set()
    for path in (ROOT / "tests" / "faults").glob("test_*.py"):
        for reply in re.findall(r'reply=b"([^"]*)"', path.read_text()):
            text = reply.replace("{tag} ", "").replace("\\r\\n", "").strip()
            if "seen in clear" in text:  # the proxy's own self-test, not a provider answer
                continue
            injected.add(text)
    assert len(injected) >= 3
    for text in injected:
        assert any(p.search(text) for p in patterns), f"no row in docs/troubleshooting.md for {text!r}"
