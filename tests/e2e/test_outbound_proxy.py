"""Outbound proxies: identity-provider requests and upstream IMAP through a real tinyproxy.

The sans-IO CONNECT exchange (:mod:`gateway.protocol.http_connect`) is checked byte for byte;
everything else runs against the lab (Dovecot, the OAuth server) behind Debian's tinyproxy
(``tests/lab/tinyproxy.py``): an open proxy, one that needs Basic credentials and one that
refuses every client.
"""

from __future__ import annotations

import base64
import imaplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.config import Limits, ProviderConfig
from gateway.errors import TemporaryFailure, UpstreamError
from gateway.oauth import grants
from gateway.protocol.http_connect import ConnectHandshake, ProxyProtocolError, parse_proxy_url
from gateway.upstream.login import open_upstream
from tests.fixtures.gateway import client_ssl_context, lab_provider, loopback_listeners, make_config, start_gateway
from tests.lab import LabDovecot, LabOAuthServer
from tests.lab.tinyproxy import LabProxy
from tests.fixtures.imap import PASSWORD, USER, seed_account
from tests.fixtures.upstream import LabAccount

LIMITS = Limits(upstream_connect_timeout=10, upstream_command_timeout=20)


# ------------------------------------------------------------------ the CONNECT exchange


def test_connect_request_bytes_with_and_without_credentials() -> None:
    plain = ConnectHandshake(parse_proxy_url("http://proxy:3128"), "imap.example", 993)
    request = plain.request()
    assert request.startswith(b"CONNECT imap.example:993 HTTP/1.1\r\n")
    assert b"host: imap.example:993\r\n" in request.lower()
    assert b"proxy-authorization" not in request.lower()
    assert request.endswith(b"\r\n\r\n")

    proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy:3128")
    assert (proxy.username, proxy.password, proxy.where) == ("us@er", "p:ss", "proxy:3128")
    assert "p:ss" not in repr(proxy)
    authed = ConnectHandshake(proxy, "::1", 993).request()
    assert authed.startswith(b"CONNECT [::1]:993 HTTP/1.1\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in authed.split(b"\r\n")[1:])}
    assert headers[b"proxy-authorization"] == b"Basic " + base64.b64encode(b"us@er:p:ss")


@pytest.mark.parametrize("url", ["https://proxy:3128", "http://proxy", "proxy:3128", "http://:3128"])
def test_proxy_url_must_be_http_host_port(url: str) -> None:
    with pytest.raises(ValueError):
        parse_proxy_url(url)


def test_connect_answer_split_anywhere_keeps_the_tunnel_bytes() -> None:
    answer = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n* OK greeting\r\n"
    for cut in range(1, len(answer)):
        handshake = ConnectHandshake(parse_proxy_url("http://p:1"), "h", 143)
        handshake.request()
        first = handshake.feed(answer[:cut])
        result = first if first is not None else handshake.feed(answer[cut:])
        assert result is not None and result.ok and result.status == 200
        if first is not None:  # answered before the rest arrived: the rest is tunnel data
            assert answer[:cut].endswith(b"\r\n\r\n") or result.leftover
        else:
            assert result.leftover == b"* OK greeting\r\n"


@pytest.mark.parametrize(("answer", "status", "wants"), [
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", 407, True),
    (b"HTTP/1.0 403 Access violation\r\n\r\nbody", 403, False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n\r\n", 502, False),
])
def test_connect_refusals(answer: bytes, status: int, wants: bool) -> None:
    handshake = ConnectHandshake(parse_proxy_url("http://p:1"), "h", 993)
    handshake.request()
    result = handshake.feed(answer)
    assert result is not None and not result.ok
    assert (result.status, result.wants_credentials, result.leftover) == (status, wants, b"")


@pytest.mark.parametrize("answer", [b"* OK IMAP4rev1 ready\r\n", b"SSH-2.0-OpenSSH\r\n\r\n"])
def test_not_http_is_a_protocol_error(answer: bytes) -> None:
    handshake = ConnectHandshake(parse_proxy_url("http://p:1"), "h", 993)
    handshake.request()
    with pytest.raises(ProxyProtocolError, match="p:1"):
        handshake.feed(answer)
        handshake.feed(b"")


def test_oversized_answer_head_is_refused() -> None:
    handshake = ConnectHandshake(parse_proxy_url("http://p:1"), "h", 993, max_head=1024)
    handshake.request()
    with pytest.raises(ProxyProtocolError):
        handshake.feed(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 4096)


# ------------------------------------------------------------------ the lab proxies

@pytest.fixture(scope="module")
def open_proxy() -> Iterator[LabProxy]:
    with LabProxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def auth_proxy() -> Iterator[LabProxy]:
    with LabProxy(credentials=("gate", "s3cret-proxy")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def refusing_proxy() -> Iterator[LabProxy]:
    with LabProxy(refuse=True) as proxy:
        yield proxy


def idp(oauth: LabOAuthServer, **proxy: object) -> ProviderConfig:
    raw = lab_provider_model(oauth)
    return ProviderConfig.model_validate({**raw, **proxy})


def lab_provider_model(oauth: LabOAuthServer) -> dict[str, object]:
    return {"name": "lab", "imap": "127.0.0.1:1", "authorize_url": oauth.authorize_url,
            "token_url": oauth.token_url, "client_id": oauth.client_id,
            "client_secret": oauth.client_secret, "scopes": ["mail"]}


def imap_provider(lab: LabDovecot, oauth: LabOAuthServer, proxy: str, *, port: str = "imaps",
                  tls: str = "implicit") -> ProviderConfig:
    return ProviderConfig(
        name="lab", imap=f"localhost:{lab.ports[port]}", imap_tls=tls, ca_file=lab.ca_file,
        authorize_url=oauth.authorize_url, token_url=oauth.token_url, client_id="mailgate",
        upstream_proxy=proxy,
    )


@pytest.mark.lab
@pytest.mark.parametrize("which", ["open", "auth"])
async def test_token_requests_go_through_the_proxy(oauth_server: LabOAuthServer, lab_user: str,
                                                   open_proxy: LabProxy, auth_proxy: LabProxy,
                                                   which: str) -> None:
    proxy = open_proxy if which == "open" else auth_proxy
    _, refresh = oauth_server.issue_tokens(lab_user)
    before = proxy.log_text().count("/token")
    answer = await grants.refresh(idp(oauth_server, https_proxy=proxy.url), refresh, timeout=10)
    assert answer.access_token
    assert proxy.log_text().count("/token") > before  # it really went through tinyproxy


@pytest.mark.lab
async def test_token_request_fails_clearly_when_the_proxy_refuses(
        oauth_server: LabOAuthServer, lab_user: str, refusing_proxy: LabProxy, auth_proxy: LabProxy) -> None:
    _, refresh = oauth_server.issue_tokens(lab_user)
    where = f"proxy 127.0.0.1:{refusing_proxy.port}"
    # A real identity provider is https: the proxy refuses the CONNECT tunnel.
    https_idp = idp(oauth_server, https_proxy=refusing_proxy.url).model_copy(
        update={"token_url": "https://login.example.invalid/token"})
    with pytest.raises(TemporaryFailure) as refused:
        await grants.refresh(https_idp, refresh, timeout=10)
    assert f"{where} refused the tunnel to identity provider login.example.invalid" in str(refused.value)
    assert "403" in str(refused.value)
    # The lab's is plain http: the proxy answers the forwarded request itself (or, as tinyproxy
    # may, closes the connection before reading the whole request): the proxy is named.
    with pytest.raises(TemporaryFailure) as refused:
        await grants.refresh(idp(oauth_server, https_proxy=refusing_proxy.url), refresh, timeout=10)
    assert where in str(refused.value)
    assert "did the proxy refuse" in str(refused.value) or "unreachable through" in str(refused.value)
    no_credentials = https_idp.model_copy(update={"https_proxy": auth_proxy.bare_url})
    with pytest.raises(TemporaryFailure) as wants:
        await grants.refresh(no_credentials, refresh, timeout=10)
    assert "407" in str(wants.value) and "wants credentials" in str(wants.value)
    # A wrong password is refused the same way and never shown.
    bad = auth_proxy.bare_url.replace("http://", "http://gate:wrong-pass-123@")
    with pytest.raises(TemporaryFailure) as wrong:
        await grants.refresh(https_idp.model_copy(update={"https_proxy": bad}), refresh, timeout=10)
    assert "wants credentials" in str(wrong.value) and "wrong-pass-123" not in str(wrong.value)


@pytest.mark.lab
async def test_trust_env_uses_the_environment_proxy_and_no_proxy(
        oauth_server: LabOAuthServer, lab_user: str, open_proxy: LabProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, refresh = oauth_server.issue_tokens(lab_user)
    monkeypatch.setenv("HTTP_PROXY", open_proxy.url)  # the lab's identity provider is http://
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def through_proxy(**options: object) -> bool:
        before = open_proxy.log_text().count("/token")
        assert (await grants.refresh(idp(oauth_server, **options), refresh, timeout=10)).access_token
        return open_proxy.log_text().count("/token") > before

    assert not await through_proxy()  # the environment is ignored unless trust_env is on
    assert await through_proxy(trust_env=True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert not await through_proxy(trust_env=True)


@pytest.mark.lab
@pytest.mark.parametrize(("port", "tls"), [("imaps", "implicit"), ("imap", "starttls")])
async def test_imap_login_through_the_proxy(lab: LabDovecot, oauth_server: LabOAuthServer, lab_user: str,
                                            open_proxy: LabProxy, auth_proxy: LabProxy,
                                            port: str, tls: str) -> None:
    for proxy in (open_proxy, auth_proxy):
        provider = imap_provider(lab, oauth_server, proxy.url, port=port, tls=tls)
        before = proxy.log_text().count(f"CONNECT localhost:{lab.ports[port]}")
        client = await open_upstream(LabAccount(oauth_server, lab_user, provider), LIMITS)
        try:
            info = await client.select("INBOX")
            assert info.exists == 0
        finally:
            await client.logout(5.0)
        assert proxy.log_text().count(f"CONNECT localhost:{lab.ports[port]}") > before


@pytest.mark.lab
async def test_imap_fails_clearly_when_the_proxy_refuses(lab: LabDovecot, oauth_server: LabOAuthServer,
                                                         lab_user: str, refusing_proxy: LabProxy,
                                                         auth_proxy: LabProxy) -> None:
    events: list[dict[str, object]] = []
    account = LabAccount(oauth_server, lab_user, imap_provider(lab, oauth_server, refusing_proxy.url))
    with pytest.raises(UpstreamError) as refused:
        await open_upstream(account, LIMITS, publish=events.append)
    assert f"proxy 127.0.0.1:{refusing_proxy.port} refused the tunnel to localhost:" in str(refused.value)
    assert "403" in str(refused.value)
    assert events[-1]["type"] == "upstream.error"

    account = LabAccount(oauth_server, lab_user, imap_provider(lab, oauth_server, auth_proxy.bare_url))
    with pytest.raises(UpstreamError, match="wants credentials.*407"):
        await open_upstream(account, LIMITS)

    # Nobody listening: the proxy's address is named.
    dead = auth_proxy.bare_url.rsplit(":", 1)[0] + ":1"
    account = LabAccount(oauth_server, lab_user, imap_provider(lab, oauth_server, dead))
    with pytest.raises(UpstreamError, match="cannot connect to proxy 127.0.0.1:1"):
        await open_upstream(account, LIMITS)


@pytest.mark.lab
async def test_gateway_with_network_proxies_end_to_end(
        nursery: trio.Nursery, tmp_path: Path, lab: LabDovecot, oauth_server: LabOAuthServer,
        lab_user: str, auth_proxy: LabProxy) -> None:
    """[network] https_proxy and upstream_proxy, inherited by the provider: a client's login
    refreshes the token and reaches Dovecot through tinyproxy."""
    provider = lab_provider(lab, oauth_server)
    provider["imap"] = f"localhost:{lab.ports['imaps']}"
    config = make_config(tmp_path, {
        "server": {"hostname": "localhost", "state_dir": "state"},
        "listener": loopback_listeners("imap")[:1],
        "admin": {"enabled": False},
        "network": {"https_proxy": auth_proxy.url, "upstream_proxy": auth_proxy.url},
        "providers": {"lab": provider},
        "users": {USER: {"provider": "lab", "upstream_user": lab_user}},
        "limits": {"auth_failure_delay": 0, "token_request_timeout": 5, "upstream_connect_timeout": 5},
    })
    assert config.providers["lab"].upstream_proxy == auth_proxy.url
    assert config.providers["lab"].https_proxy == auth_proxy.url
    _, refresh = oauth_server.issue_tokens(lab_user)
    await seed_account(config, refresh)
    server = await start_gateway(nursery, config)
    log_before = auth_proxy.log_text()
    host, port = server.addresses[0]
    ctx = client_ssl_context(config)

    def session() -> list[bytes]:
        with imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx, timeout=20) as client:
            client.login(USER, PASSWORD)
            typ, data = client.select("INBOX")
            assert typ == "OK", data
            return [d for d in data if isinstance(d, bytes)]

    assert await trio.to_thread.run_sync(session) == [b"0"]
    log_after = auth_proxy.log_text()[len(log_before):]
    assert "/token" in log_after  # the refresh grant went through the proxy
    assert f"CONNECT localhost:{lab.ports['imaps']}" in log_after
