"""The configuration of several processes and instances: ``[server] workers``, ``[store] url``,
``proxy_protocol_from``, and the limits a worker runs with (gateway/config.py, per_worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import WORKER_DIVIDED_LIMITS, Config, parse_config, per_worker
from gateway.errors import ConfigError
from gateway.logs import redact


def config(tmp_path: Path, **sections: object) -> Config:
    return parse_config(dict(sections), base_dir=tmp_path)


def test_workers_default_auto_and_bounds(tmp_path: Path) -> None:
    assert config(tmp_path).server.worker_count == 1
    assert config(tmp_path, server={"workers": 3}).server.worker_count == 3
    assert config(tmp_path, server={"workers": "auto"}).server.worker_count == (os.cpu_count() or 1)
    for bad in (0, -1, "many", 1000):
        with pytest.raises(ConfigError, match="server.workers"):
            config(tmp_path, server={"workers": bad})


def test_a_worker_gets_its_share_of_the_whole_gateway_caps(tmp_path: Path) -> None:
    one = config(tmp_path, limits={"max_connections": 1000, "upstream_connections_per_account": 15,
                                   "max_connections_per_ip": 100, "kdf_concurrency": 3})
    assert per_worker(one) is one  # one worker: unchanged
    three = config(tmp_path, server={"workers": 3},
                   limits={"max_connections": 1000, "upstream_connections_per_account": 15,
                           "max_connections_per_ip": 100, "kdf_concurrency": 2})
    shared = per_worker(three).limits
    assert (shared.max_connections, shared.upstream_connections_per_account,
            shared.max_connections_per_ip, shared.kdf_concurrency) == (333, 5, 33, 1)
    # Never above the configured total across workers; never zero.
    for key in WORKER_DIVIDED_LIMITS:
        assert 1 <= getattr(shared, key) * 3 <= max(3, getattr(three.limits, key))
    # Everything else is as configured.
    assert shared.login_timeout == three.limits.login_timeout


def test_store_url_must_be_postgresql_and_never_shows(tmp_path: Path) -> None:
    url = "postgresql://mailgate:s3cret-Pw-123@db.example.lan/mailgate"
    cfg = config(tmp_path, store={"url": url})
    assert cfg.store.url is not None and cfg.store.url.get_secret_value() == url
    assert "s3cret" not in repr(cfg)
    with pytest.raises(ConfigError, match="store.url"):
        config(tmp_path, store={"url": "mysql://x"})
    from gateway.app import _register_secrets

    _register_secrets(cfg)
    assert "s3cret-Pw-123" not in redact("connect failed: password s3cret-Pw-123 rejected")


def test_proxy_protocol_from_takes_networks(tmp_path: Path) -> None:
    cfg = config(tmp_path, listener=[{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
                                      "proxy_protocol_from": ["10.0.0.2", "fd00::/64"]}])
    assert [str(n) for n in cfg.listeners[0].proxy_protocol_from] == ["10.0.0.2/32", "fd00::/64"]
    with pytest.raises(ConfigError, match="proxy_protocol_from"):
        config(tmp_path, listener=[{"protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
                                    "proxy_protocol_from": ["haproxy.lan"]}])
