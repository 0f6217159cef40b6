"""Log redaction: the second line of defence behind code that never logs secrets."""

import io
import json
import logging

import pytest

from gateway.logs import redact, register_secret, setup_logging


@pytest.mark.parametrize(
    "line, secret",
    [
        ("a1 LOGIN alice s3cret-pw", "s3cret-pw"),
        ("a1 login alice s3cret-pw", "s3cret-pw"),
        ("x AUTHENTICATE PLAIN AGFsaWNlAHMzY3JldA==", "AGFsaWNlAHMzY3JldA=="),
        ("PASS hunter22", "hunter22"),
        ("Authorization: Bearer ya29.a0AfB_token", "ya29.a0AfB_token"),
        ("grant_type=refresh_token&refresh_token=1//0gRT&client_id=x", "1//0gRT"),
        ('{"access_token": "tok-123", "expires_in": 3600}', "tok-123"),
        ("client_secret=GOCSPX-abc", "GOCSPX-abc"),
    ],
)
def test_credential_shapes_are_masked(line: str, secret: str) -> None:
    out = redact(line)
    assert secret not in out and "[redacted]" in out


def test_ordinary_sentences_are_left_alone() -> None:
    for line in ["login failed for 'carol' from 10.0.0.9", "alice logged in", "session end: user=bob"]:
        assert redact(line) == line


def test_registered_secrets_are_masked_anywhere_including_tracebacks() -> None:
    register_secret("opaque-refresh-7f3a9c")
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log = logging.getLogger("mailgate.test")
    try:
        raise ValueError("token opaque-refresh-7f3a9c was refused")
    except ValueError:
        log.exception("refresh with %s failed", "opaque-refresh-7f3a9c")
    logging.getLogger().handlers.clear()
    text = out.getvalue()
    assert "opaque-refresh-7f3a9c" not in text
    entry = json.loads(text.splitlines()[0])
    assert entry["message"] == "refresh with [redacted] failed"
    assert "ValueError: token [redacted] was refused" in entry["exception"]


def test_a_registered_secret_inside_a_key_name_does_not_unmask_the_value() -> None:
    register_secret("ient_sec")  # part of "client_secret": masked first, it used to hide the key
    out = redact("client_secret=GOCSPX-xyz&code=4/0Ab")
    assert "GOCSPX-xyz" not in out and "4/0Ab" not in out and "ient_sec" not in out
    register_secret("pw-with code=inside")  # a secret the patterns would cut in two
    assert redact("got pw-with code=inside now") == "got [redacted] now"
