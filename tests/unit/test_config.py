"""Config loading: every problem at once, with key paths; presets; relative paths."""

from pathlib import Path

import pytest

from gateway.config import load_config, parse_config, parse_hostport
from gateway.errors import ConfigError

GOOD = """
[server]
state_dir = "state"
hostname = "mail.example.lan"

[tls]
cert_file = "certs/mailgate.pem"
key_file = "certs/mailgate.key"

[[listener]]
protocol = "imap"
bind = "127.0.0.1:1993"
tls = "implicit"

[[listener]]
protocol = "pop3"
bind = "[::1]:1110"
tls = "starttls"
plaintext_auth_from = ["192.168.10.0/24", "10.0.0.5"]

[admin]
bind = "127.0.0.1:8025"

[providers.lab]
imap = "127.0.0.1:10993"
imap_tls = "implicit"
ca_file = "lab-ca.pem"
sasl = "xoauth2"
flow = "authorization_code"
authorize_url = "http://127.0.0.1:9000/authorize"
token_url = "http://127.0.0.1:9000/token"
scopes = ["mail"]
client_id = "mailgate"
client_secret = "secret"

[users.alice]
provider = "lab"
upstream_user = "alice@example.com"
pop3_delete = "trash"
"""


def test_good_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "mailgate.toml"
    path.parent.mkdir()
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.server.state_dir == path.parent / "state"
    assert cfg.tls.cert_file == path.parent / "certs/mailgate.pem"
    assert cfg.providers["lab"].ca_file == path.parent / "lab-ca.pem"
    assert cfg.listeners[1].host == "::1" and cfg.listeners[1].port == 1110
    assert [str(n) for n in cfg.listeners[1].plaintext_auth_from] == [
        "192.168.10.0/24",
        "10.0.0.5/32",
    ]
    assert cfg.users["alice"].name == "alice"
    assert cfg.users["alice"].pop3_mailbox == "INBOX"
    assert cfg.providers["lab"].imap_port == 10993
    # Secrets never show in a repr.
    assert "secret" not in repr(cfg.providers["lab"].client_secret)


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    bad = (
        GOOD.replace('hostname = "mail.example.lan"', 'hostnam = "x"')
        .replace('protocol = "imap"', 'protocol = "imapx"')
        .replace('bind = "127.0.0.1:1993"', 'bind = "127.0.0.1:99999"')
        .replace('tls = "starttls"', 'tls = "sometimes"')
        .replace('"10.0.0.5"', '"300.1.1.1"')
        .replace('provider = "lab"', 'provider = "lbb"')
        .replace('pop3_delete = "trash"', 'pop3_delete = "nuke"')
        .replace('bind = "127.0.0.1:8025"', 'bind = "0.0.0.0:8025"')
    )
    path = tmp_path / "mailgate.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = "\n".join(info.value.problems)
    expected = [
        "server.hostnam: unknown key",
        "listener[1].protocol: Input should be 'imap', 'pop3' or 'smtp'",
        "listener[1].bind: '127.0.0.1:99999': port must be a number from 1 to 65535",
        "listener[2].tls: Input should be 'implicit', 'starttls' or 'none' (got 'sometimes')",
        "listener[2].plaintext_auth_from: '300.1.1.1' is not a network",
        "users.alice.provider: unknown provider 'lbb'",
        "users.alice.pop3_delete: Input should be 'expunge', 'trash' or 'keep' (got 'nuke')",
        "admin: the admin port is bound to 0.0.0.0:8025, which is not loopback: set admin.token",
    ]
    for line in expected:
        assert line in problems, f"{line!r} not in:\n{problems}"
    assert len(info.value.problems) == len(expected)


def test_missing_fields_and_flow_requirements(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        """
[[listener]]
protocol = "pop3"
tls = "implicit"

[providers.x]
imap = "imap.example.com:993"
token_url = "https://idp.example.com/token"
flow = "device"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert "listener[1].bind: required key is missing" in problems
    assert any(
        p.startswith("providers.x: flow 'device' needs device_url; flow 'device' needs client_id")
        for p in problems
    ), problems


def test_duplicate_listener_addresses_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        """
[[listener]]
protocol = "imap"
bind = "127.0.0.1:1993"
tls = "implicit"
[[listener]]
protocol = "pop3"
bind = "127.0.0.1:1993"
tls = "implicit"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "listener[2].bind: 127.0.0.1:1993 is already used by listener[1]"
    ]


def test_unreadable_and_malformed_files_give_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[server\nhostname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_presets_are_merged_and_overridable(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        """
[providers.gmail]
client_id = "id.apps.googleusercontent.com"
client_secret = "s"

[providers.work]
preset = "microsoft365"
tenant = "contoso.onmicrosoft.com"
client_id = "abc"

[providers.nope]
preset = "no-such-preset"
imap = "x:1"
token_url = "http://x"
client_id = "c"
authorize_url = "http://x"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith("providers.nope.preset: unknown preset 'no-such-preset'") for p in info.value.problems)
    path.write_text(path.read_text().split("[providers.nope]")[0])
    cfg = load_config(path)
    gmail = cfg.providers["gmail"]
    assert (gmail.imap_host, gmail.imap_port, gmail.sasl) == ("imap.gmail.com", 993, "xoauth2")
    work = cfg.providers["work"]
    assert "contoso.onmicrosoft.com" in work.token_url
    assert "{tenant}" not in work.token_url
    assert work.imap_host == "outlook.office365.com"


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:993", ("127.0.0.1", 993)), ("[::1]:143", ("::1", 143)), ("mail.lan:0", ("mail.lan", 0))],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["::1:143", "host", ":993", "h:70000", "h:x", "[::1]143"])
def test_parse_hostport_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    from gateway.config import (
        AdminSection,
        Limits,
        ListenerConfig,
        NetworkSection,
        NotifySection,
        ProviderConfig,
        ServerSection,
        TLSSection,
        UserConfig,
    )

    example = Path(__file__).parents[2] / "mailgate.example.toml"
    cfg = load_config(example)
    assert cfg.users["alice"].provider == "gmail"
    text = example.read_text()
    reference = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    models = (ServerSection, TLSSection, ListenerConfig, AdminSection, UserConfig, Limits,
              NetworkSection, NotifySection)
    for model in models:
        for key in model.model_fields:
            if key == "name":
                continue
            assert f"{key} =" in text or f"# {key}" in text, f"{model.__name__}.{key} undocumented"
            assert f"`{key}`" in reference, f"{model.__name__}.{key} not in docs/configuration.md"
    for key in ProviderConfig.model_fields:
        if key != "name":
            assert f"`{key}`" in reference, f"ProviderConfig.{key} not in docs/configuration.md"


def test_network_proxies_are_inherited_by_providers_and_checked(tmp_path: Path) -> None:
    base = {
        "providers": {
            "a": {"preset": "gmail", "client_id": "x"},
            "b": {"preset": "gmail", "client_id": "x", "upstream_proxy": "", "trust_env": False},
        },
    }
    raw = {**base, "network": {"https_proxy": "http://u:p@proxy:3128", "trust_env": True,
                               "upstream_proxy": "http://proxy:3128"}}
    cfg = parse_config(raw, base_dir=tmp_path)
    a, b = cfg.providers["a"], cfg.providers["b"]
    assert (a.https_proxy, a.trust_env, a.upstream_proxy) == ("http://u:p@proxy:3128", True, "http://proxy:3128")
    assert (b.https_proxy, b.trust_env, b.upstream_proxy) == ("http://u:p@proxy:3128", False, None)
    assert parse_config(base, base_dir=tmp_path).providers["a"].upstream_proxy is None
    with pytest.raises(ConfigError) as exc:
        parse_config({**base, "network": {"upstream_proxy": "proxy:3128", "https_proxy": "http://p"},
                      "notify": {"webhook_url": "ftp://x", "command": "page-admin"}},
                     base_dir=tmp_path)
    text = "\n".join(exc.value.problems)
    for key in ("network.upstream_proxy", "network.https_proxy", "notify.webhook_url", "notify.command"):
        assert key in text, text
