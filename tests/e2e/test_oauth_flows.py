"""Every authorization flow end to end over real HTTP against the lab OAuth server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import TemporaryFailure
from gateway.oauth import flows, grants
from gateway.oauth.endpoint import OAuthErrorResponse
from gateway.oauth.pkce import make_verifier
from tests.fixtures.oauth import UPSTREAM_USER, Terminal, make_config
from tests.lab.oauth_server import LabOAuthServer

pytestmark = pytest.mark.lab


async def _follow_in_browser(url: str) -> httpx.Response:
    """What the admin's browser does: open the URL and follow the redirect to the loopback."""
    async with httpx.AsyncClient(follow_redirects=True, trust_env=False, timeout=5) as browser:
        return await browser.get(url)


async def test_authorization_code_with_loopback_redirect(idp: LabOAuthServer, tmp_path: Path):
    provider = make_config(idp, tmp_path).providers["lab"]
    term = Terminal()
    async with trio.open_nursery() as nursery:
        result: list = []

        async def run() -> None:
            result.append(await flows.authorization_code_loopback(
                provider, login_hint=UPSTREAM_USER, show=lambda s: term.write(s + "\n"),
                timeout=5, wait_limit=10,
            ))

        nursery.start_soon(run)
        await term.wait_for("Waiting")
        url = term.line_after("approve the access")
        assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
        page = await _follow_in_browser(url)
        assert page.status_code == 200 and "received the authorization" in page.text
    answer = result[0]
    assert answer.refresh_token and idp.is_active(answer.access_token)
    assert [r["grant_type"] for r in idp.token_requests] == ["authorization_code"]
    assert answer.access_token not in term.getvalue()


async def test_loopback_ignores_forged_state_then_takes_the_real_redirect(idp, tmp_path):
    provider = make_config(idp, tmp_path).providers["lab"]
    term = Terminal()
    async with trio.open_nursery() as nursery:
        result: list = []

        async def run() -> None:
            result.append(await flows.authorization_code_loopback(
                provider, login_hint=UPSTREAM_USER, show=lambda s: term.write(s + "\n"),
                timeout=5, wait_limit=10,
            ))

        nursery.start_soon(run)
        await term.wait_for("Waiting")
        redirect = re.search(r"redirect to (\S+) ", term.getvalue()).group(1)
        port = int(redirect.rstrip("/").rsplit(":", 1)[1])
        idle = await trio.open_tcp_stream("127.0.0.1", port)  # a browser's spare connection
        garbage = await trio.open_tcp_stream("127.0.0.1", port)
        await garbage.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        async with httpx.AsyncClient(trust_env=False, timeout=5) as attacker:
            forged = await attacker.get(redirect + "?code=stolen&state=wrong")
            assert forged.status_code == 400
            assert (await attacker.get(redirect + "favicon.ico")).status_code == 404
        await _follow_in_browser(term.line_after("approve the access"))
    assert result[0].refresh_token
    await idle.aclose()
    await garbage.aclose()


async def test_authorization_code_manual_paste(idp: LabOAuthServer, tmp_path: Path):
    provider = make_config(idp, tmp_path).providers["lab"]
    term = Terminal()
    send, receive = trio.open_memory_channel[str](1)
    async with trio.open_nursery() as nursery:
        result: list = []

        async def run() -> None:
            result.append(await flows.authorization_code_manual(
                provider, login_hint=UPSTREAM_USER, show=lambda s: term.write(s + "\n"),
                read_line=receive.receive, timeout=5, wait_limit=10,
            ))

        nursery.start_soon(run)
        await term.wait_for("Paste")
        async with httpx.AsyncClient(trust_env=False, timeout=5) as browser:
            redirected = await browser.get(term.line_after("approve the access"))
        location = redirected.headers["location"]
        assert location.startswith(flows.MANUAL_REDIRECT_URI + "?code=")
        await send.send(location + "\n")
    assert idp.is_active(result[0].access_token)


async def test_pkce_verifier_is_checked_by_the_server(idp: LabOAuthServer, tmp_path: Path):
    provider = make_config(idp, tmp_path).providers["lab"]
    verifier = make_verifier()
    url = flows.authorization_url(provider, redirect_uri="http://127.0.0.1/", state="s",
                                  verifier=verifier, login_hint=UPSTREAM_USER)
    async with httpx.AsyncClient(trust_env=False, timeout=5) as browser:
        location = (await browser.get(url)).headers["location"]
    code = flows.parse_pasted(location, state="s")
    with pytest.raises(OAuthErrorResponse) as err:
        await grants.exchange_code(provider, code, redirect_uri="http://127.0.0.1/",
                                   verifier=make_verifier(), timeout=5)
    assert err.value.error == "invalid_grant" and "PKCE" in err.value.description


async def test_device_code_pending_then_approved(idp: LabOAuthServer, tmp_path: Path):
    provider = make_config(idp, tmp_path, flow="device").providers["lab"]
    term = Terminal()
    async with trio.open_nursery() as nursery:
        result: list = []

        async def run() -> None:
            result.append(await flows.device_code(
                provider, show=lambda s: term.write(s + "\n"), timeout=5))

        nursery.start_soon(run)
        text = await term.wait_for("enter the code")
        user_code = text.split("enter the code ")[1].split()[0]
        assert idp.verification_url in text
        with trio.fail_after(10):  # let the flow poll at least once while pending
            while not any(r["error"] == "authorization_pending" for r in idp.token_requests):
                await trio.sleep(0.05)
        idp.approve_device(user_code, UPSTREAM_USER)
    assert result[0].refresh_token and idp.is_active(result[0].access_token)
    errors = [r["error"] for r in idp.token_requests]
    assert errors[0] == "authorization_pending" and errors[-1] is None
    assert "slow_down" not in errors


async def test_device_code_denied_and_expired(tmp_path: Path):
    with LabOAuthServer(device_code_lifetime=2) as idp:
        provider = make_config(idp, tmp_path, flow="device").providers["lab"]
        term = Terminal()
        with pytest.raises(flows.FlowError, match="expired"):
            await flows.device_code(provider, show=lambda s: term.write(s + "\n"), timeout=5)

        term2 = Terminal()
        async with trio.open_nursery() as nursery:
            async def deny() -> None:
                text = await term2.wait_for("enter the code")
                idp.deny_device(text.split("enter the code ")[1].split()[0])

            nursery.start_soon(deny)
            with pytest.raises(flows.FlowError, match="denied"):
                await flows.device_code(provider, show=lambda s: term2.write(s + "\n"), timeout=5)


async def test_client_credentials(idp: LabOAuthServer, tmp_path: Path):
    idp.client_credentials_user = "shared@example.com"
    provider = make_config(idp, tmp_path, flow="client_credentials").providers["lab"]
    answer = await flows.app_token(provider, subject="ignored", timeout=5)
    assert idp.is_active(answer.access_token) and answer.refresh_token is None
    assert idp.token_requests[-1]["grant_type"] == "client_credentials"


async def test_client_credentials_with_a_wrong_secret_is_refused(idp, tmp_path):
    provider = make_config(idp, tmp_path, flow="client_credentials",
                           provider={"client_secret": "wrong"}).providers["lab"]
    with pytest.raises(OAuthErrorResponse) as err:
        await flows.app_token(provider, subject="x", timeout=5)
    assert err.value.error == "invalid_client" and "wrong" not in str(err.value)


def _service_account(idp: LabOAuthServer, path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({"type": "service_account", "client_email": "sa@lab.iam",
                                "private_key": pem, "private_key_id": "k1"}))
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    idp.register_jwt_issuer("sa@lab.iam", public)
    return path


async def test_service_account_jwt_bearer_verified_by_the_server(idp, tmp_path):
    key_file = _service_account(idp, tmp_path / "sa.json")
    config = make_config(idp, tmp_path, flow="service_account",
                         provider={"service_account_key_file": str(key_file)},
                         upstream_user="bob@example.com")
    answer = await flows.app_token(config.providers["lab"], subject="bob@example.com", timeout=5)
    assert idp.is_active(answer.access_token)
    assert idp.token_requests[-1] == {**idp.token_requests[-1], "status": 200,
                                      "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}


async def test_refresh_token_import_grant(idp: LabOAuthServer, tmp_path: Path):
    _, refresh_token = idp.issue_tokens(UPSTREAM_USER)
    provider = make_config(idp, tmp_path).providers["lab"]
    answer = await grants.refresh(provider, refresh_token, timeout=5)
    assert idp.is_active(answer.access_token)


@pytest.mark.parametrize("mode", [("status", 503), ("malformed",)])
async def test_idp_failures_are_temporary(idp: LabOAuthServer, tmp_path: Path, mode):
    idp.fail_mode = mode
    provider = make_config(idp, tmp_path).providers["lab"]
    with pytest.raises(TemporaryFailure):
        await grants.refresh(provider, "rt-whatever", timeout=5)


async def test_hanging_idp_hits_the_deadline(idp: LabOAuthServer, tmp_path: Path):
    idp.fail_mode = ("hang", 30)
    provider = make_config(idp, tmp_path).providers["lab"]
    with trio.fail_after(10):
        with pytest.raises(TemporaryFailure, match="did not answer within 0.5 s"):
            await grants.refresh(provider, "rt-whatever", timeout=0.5)


async def test_unreachable_idp_is_temporary(tmp_path: Path):
    with LabOAuthServer() as idp:
        provider = make_config(idp, tmp_path).providers["lab"]
    with pytest.raises(TemporaryFailure, match="unreachable"):
        await grants.refresh(provider, "rt-whatever", timeout=5)
