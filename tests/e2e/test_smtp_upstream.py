"""The upstream SMTP client against the lab's real submission server (Dovecot checking tokens
by introspection), and the table of provider answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from gateway.config import Config, ProviderConfig
from gateway.errors import ReauthorizationRequired, UpstreamError
from gateway.protocol.smtp import Reply
from gateway.upstream.smtp import SmtpRefused, open_smtp
from gateway.upstream.smtp_answers import Meaning, explain
from gateway.upstream.smtp_connector import SmtpConnector
from tests.fixtures.gateway import lab_provider, make_config
from tests.lab import LabDovecot, LabOAuthServer


def smtp_provider(lab: LabDovecot, oauth: LabOAuthServer, *, tls: str = "implicit",
                  sasl: str = "xoauth2", smtp: str | None = None) -> dict[str, object]:
    port = lab.ports["submissions" if tls == "implicit" else "submission"]
    return {**lab_provider(lab, oauth), "smtp": smtp or f"{lab.host}:{port}", "smtp_tls": tls,
            "sasl": sasl}


def config_for(tmp_path: Path, provider: dict[str, object], upstream_user: str) -> Config:
    return make_config(tmp_path, {
        "providers": {"lab": provider},
        "users": {"alice": {"provider": "lab", "upstream_user": upstream_user}},
        "limits": {"upstream_connect_timeout": 5, "upstream_command_timeout": 10},
    })


@dataclass
class LabTokens:
    """A token source handing out lab tokens; ``bad_first`` spoils the first N tokens."""

    oauth: LabOAuthServer
    upstream_user: str
    provider: ProviderConfig
    name: str = "alice"
    bad_first: int = 0
    requests: list[bool] = field(default_factory=list)

    async def access_token(self, *, force_refresh: bool = False) -> str:
        self.requests.append(force_refresh)
        access, _ = self.oauth.issue_tokens(self.upstream_user)
        if len(self.requests) <= self.bad_first:
            self.oauth.revoke(access)
        return access


pytestmark = pytest.mark.lab


@pytest.mark.parametrize("tls, sasl", [("implicit", "xoauth2"), ("starttls", "oauthbearer")])
async def test_login_and_transaction_reach_the_sink(tmp_path: Path, lab: LabDovecot,
                                                    oauth_server: LabOAuthServer, lab_user: str,
                                                    tls: str, sasl: str) -> None:
    config = config_for(tmp_path, smtp_provider(lab, oauth_server, tls=tls, sasl=sasl), lab_user)
    tokens = LabTokens(oauth_server, lab_user, config.providers["lab"])
    rcpt = f"to-{lab_user}"  # the sink is shared by the session's tests
    client = await open_smtp(tokens, config.limits)
    try:
        assert client.offers("CHUNKING") and client.offers("8BITMIME")
        assert (await client.command(f"MAIL FROM:<{lab_user}>")).code == 250
        assert (await client.command(f"RCPT TO:<{rcpt}>")).code == 250
        refused = await client.command("RCPT TO:<refuse1@example.net>")
        assert (refused.code, refused.enhanced) == (550, "5.0.0") and "5.1.1" in refused.text
        assert (await client.command("DATA")).code == 354
        await client.send_data(b"Subject: up\r\n\r\n..dot\r\n.\r\n")
        assert (await client.data_reply()).code == 250
    finally:
        await client.quit(5)
    assert tokens.requests == [False]
    assert lab.sink is not None
    [stored] = await trio.to_thread.run_sync(lab.sink.wait_for, rcpt)
    assert stored.data.endswith(b"Subject: up\r\n\r\n.dot\r\n")


async def test_a_rejected_token_is_refreshed_once(tmp_path: Path, lab: LabDovecot,
                                                 oauth_server: LabOAuthServer, lab_user: str) -> None:
    config = config_for(tmp_path, smtp_provider(lab, oauth_server), lab_user)
    tokens = LabTokens(oauth_server, lab_user, config.providers["lab"], bad_first=1)
    client = await open_smtp(tokens, config.limits)
    await client.quit(5)
    assert tokens.requests == [False, True]


async def test_two_rejected_tokens_need_reauthorization(tmp_path: Path, lab: LabDovecot,
                                                        oauth_server: LabOAuthServer, lab_user: str) -> None:
    config = config_for(tmp_path, smtp_provider(lab, oauth_server), lab_user)
    tokens = LabTokens(oauth_server, lab_user, config.providers["lab"], bad_first=2)
    connector = SmtpConnector(config)
    with pytest.raises(ReauthorizationRequired, match="re-authorize to send"):
        await connector.open(tokens)
    assert tokens.requests == [False, True]
    assert connector.slots("alice").in_use == 0  # the slot went back


async def test_unreachable_upstream_is_temporary(tmp_path: Path, lab: LabDovecot,
                                                 oauth_server: LabOAuthServer, lab_user: str) -> None:
    config = config_for(tmp_path, smtp_provider(lab, oauth_server, smtp="127.0.0.1:1"), lab_user)
    tokens = LabTokens(oauth_server, lab_user, config.providers["lab"])
    with pytest.raises(UpstreamError, match="cannot connect"):
        await open_smtp(tokens, config.limits)


async def test_extensions_are_probed_and_cached(tmp_path: Path, lab: LabDovecot,
                                                oauth_server: LabOAuthServer, lab_user: str) -> None:
    config = config_for(tmp_path, smtp_provider(lab, oauth_server), lab_user)
    connector = SmtpConnector(config)
    first = await connector.extensions(config.providers["lab"])
    assert first is not None and "CHUNKING" in first and "SIZE" in first
    assert await connector.extensions(config.providers["lab"]) is first  # from the cache


@pytest.mark.parametrize("reply, key, meaning", [
    (Reply(535, ("5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",)),
     "smtp_auth_disabled", Meaning.PERMANENT),
    (Reply(550, ("5.7.30 Basic authentication is not supported for Client Submission.",)),
     "basic_auth_refused", Meaning.PERMANENT),
    (Reply(554, ("5.2.252 SendAsDenied; alice@contoso.com not allowed to send as bob@contoso.com",)),
     "send_as_denied", Meaning.PERMANENT),
    (Reply(550, ("5.7.60 SMTP; Client does not have permissions to send as this sender",)),
     "send_as_denied", Meaning.PERMANENT),
    (Reply(535, ("5.7.3 Authentication unsuccessful",)), "token_rejected", Meaning.TOKEN_REJECTED),
    (Reply(535, ("5.7.8 Username and Password not accepted. For more information, go to",
                 "5.7.8  https://support.google.com/mail/?p=BadCredentials")),
     "token_rejected", Meaning.TOKEN_REJECTED),
    (Reply(530, ("5.7.0 Authentication Required.",)), "auth_required", Meaning.PERMANENT),
    (Reply(451, ("4.7.0 Temporary rate limit, try again later",)), "throttled", Meaning.TEMPORARY),
    (Reply(421, ("4.3.2 Service not available",)), "service_unavailable", Meaning.TEMPORARY),
    (Reply(454, ("4.7.0 Temporary authentication failure",)), "temporary_auth_failure", Meaning.TEMPORARY),
])
def test_provider_answers_are_explained(reply: Reply, key: str, meaning: Meaning) -> None:
    explained = explain(reply)
    assert explained is not None and (explained.key, explained.meaning) == (key, meaning)
    assert explained.advice


def test_ordinary_answers_need_no_explanation() -> None:
    assert explain(Reply(250, ("2.0.0 OK",))) is None
    assert explain(Reply(550, ("5.1.1 No such user",))) is None


def test_smtp_refused_carries_the_reply() -> None:
    reply = Reply(535, ("5.7.139 disabled",))
    err = SmtpRefused("refused", reply, explain(reply))
    assert err.reply is reply and err.explanation is not None


async def test_a_failed_probe_is_not_repeated_at_every_ehlo(tmp_path: Path, lab: LabDovecot,
                                                             oauth_server: LabOAuthServer, lab_user: str) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts, never answers: each probe would wait its whole timeout
    port = listener.getsockname()[1]
    config = config_for(tmp_path, smtp_provider(lab, oauth_server, smtp=f"127.0.0.1:{port}"), lab_user)
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"upstream_connect_timeout": 0.5})})
    connector = SmtpConnector(config)
    results: list[object] = []

    async def ehlo() -> None:
        results.append(await connector.extensions(config.providers["lab"]))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ehlo)
    assert results == [None] * 5
    assert trio.current_time() - start < 2.0  # one probe (0.5 s), not five in a row
    listener.close()
