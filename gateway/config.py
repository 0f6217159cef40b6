"""Configuration: one TOML file, validated all at once.

Theory of operation
-------------------
``load_config(path)`` reads the file with :mod:`tomllib`, merges every ``[providers.X]`` table
over its built-in preset (``gateway.presets.PRESETS``, chosen by ``preset = "..."`` or by
the table's own name), validates the result with pydantic and then runs the cross-checks pydantic
cannot express (a user naming an unknown provider, two listeners on one address, ...).

Every problem found is collected and raised together as one :class:`ConfigError` whose lines read
``key.path: what is wrong (what would be valid)``: an admin fixes a config in one pass, and never
sees a traceback. Relative paths are resolved against the directory of the config file, so the
same file works whatever the current directory of the service is.

The models are frozen: a running gateway never mutates its configuration; SIGHUP builds a new
``Config`` and swaps it in whole.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from urllib.parse import urlsplit
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import ConfigError
from .presets import PRESETS

DEFAULT_CONFIG_NAME = "mailgate.toml"


def parse_hostport(value: str, *, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:993``) and check the port."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a string like '127.0.0.1:993' or '[::1]:993'")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not host:port (IPv6 is written as '[::1]:993')")
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{value!r} is not host:port (IPv6 is written as '[::1]:993')")
    if not host:
        raise ValueError(f"{value!r} has no host (use 0.0.0.0 for every address)")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535 (0: any free port)")
    return host, int(port)


def _valid_hostport(value: str) -> str:
    parse_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_valid_hostport)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Bound(_Section):
    """A section with a ``bind = "host:port"`` key."""

    bind: HostPort

    @property
    def host(self) -> str:
        return parse_hostport(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.bind)[1]


class ServerSection(_Section):
    state_dir: Path = Path("state")
    hostname: str = "localhost"
    # Processes sharing the listeners (SO_REUSEPORT) and state_dir; "auto": one per core.
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = 1

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers


class StoreSection(_Section):
    # Unset: the SQLite file in server.state_dir. "postgresql://user:pw@host/db": a database
    # several instances share (gateway/oauth/pg_store.py).
    url: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _postgres(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or leave it out for SQLite)")
        return v


class TLSSection(_Section):
    cert_file: Path = Path("certs/mailgate.pem")
    key_file: Path = Path("certs/mailgate.key")
    min_version: Literal["1.2", "1.3"] = "1.2"


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def in_networks(host: str, networks: Networks) -> bool:
    """Whether the address ``host`` (IPv4-mapped IPv6 counted as IPv4, a zone id ignored) lies
    in one of ``networks``: the one test behind ``plaintext_auth_from``, ``relay_from`` and
    ``proxy_protocol_from``."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class ListenerConfig(_Bound):
    protocol: Literal["imap", "pop3", "smtp"]
    tls: Literal["implicit", "starttls", "none"]
    plaintext_auth_from: Networks = Field(default_factory=list)
    # Load balancers that must send a PROXY protocol header (gateway/proxied.py).
    proxy_protocol_from: Networks = Field(default_factory=list)
    # SMTP only (docs/smtp.md): devices on these networks may send without AUTH, as relay_user.
    relay_from: Networks = Field(default_factory=list)
    relay_user: str | None = None

    @field_validator("plaintext_auth_from", "proxy_protocol_from", "relay_from", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        if isinstance(v, list):
            out = []
            for item in v:
                try:
                    out.append(ipaddress.ip_network(item, strict=False))
                except (ValueError, TypeError):
                    raise ValueError(
                        f"{item!r} is not a network (write '192.168.10.0/24' or '10.0.0.5')"
                    ) from None
            return out
        return v

    @property
    def name(self) -> str:
        return f"{self.protocol}/{self.tls}@{self.bind}"

    @model_validator(mode="after")
    def _relay_pair(self) -> "ListenerConfig":
        if (self.relay_from or self.relay_user) and self.protocol != "smtp":
            raise ValueError("relay_from and relay_user are only for protocol = \"smtp\"")
        if bool(self.relay_from) != bool(self.relay_user):
            raise ValueError("relay_from and relay_user go together (the networks, and the user "
                             "their mail is sent as)")
        return self


class AdminSection(_Bound):
    bind: HostPort = "127.0.0.1:8025"
    enabled: bool = True
    # Required when bind is not a loopback address (see docs/security.md).
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "AdminSection":
        if self.enabled and self.token is None and not _is_loopback(self.host):
            raise ValueError(
                f"the admin port is bound to {self.bind}, which is not loopback: set admin.token "
                "(a long random string) or bind it to 127.0.0.1"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Flow = Literal["authorization_code", "device", "client_credentials", "service_account"]


def _valid_proxy_url(value: str | None) -> str | None:
    """``http://[user:pass@]host:port`` (an empty string: no proxy)."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            "must be a proxy URL like 'http://proxy.example:3128' or 'http://user:pass@proxy:3128'"
        )
    return value


ProxyURL = Annotated[str | None, AfterValidator(_valid_proxy_url)]


class NetworkSection(_Section):
    """How mailgate reaches the internet (see docs/configuration.md, ``[network]``)."""

    https_proxy: ProxyURL = None  # identity-provider requests go through this HTTP proxy
    trust_env: bool = False  # honour HTTPS_PROXY / NO_PROXY from the environment
    upstream_proxy: ProxyURL = None  # HTTP CONNECT proxy for upstream IMAP and SMTP connections


class NotifySection(_Section):
    """Telling a person: a command and/or a webhook (see docs/operations.md)."""

    command: list[str] = Field(default_factory=list)  # run with the event as JSON on stdin
    webhook_url: str | None = None  # JSON POST of every notification
    webhook_token: SecretStr | None = None  # sent as "Authorization: Bearer ..."
    upstream_failing_after: float = Field(300, ge=0)  # seconds of failures before "failing"
    certificate_expiry_days: int = Field(14, ge=1)  # warn this many days before expiry

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class ProviderConfig(_Section):
    """One upstream: where its IMAP server is and how to get tokens for it."""

    name: str
    preset: str | None = None
    # Which provider this is, as far as mailgate must know (set by the presets): "microsoft365"
    # and "outlook" make the client-credentials flow ask for Exchange's ".default" scope.
    kind: str = "generic"
    imap: HostPort
    imap_tls: Literal["implicit", "starttls"] = "implicit"
    # The provider's SMTP submission server (docs/smtp.md); none: no sending through it.
    smtp: HostPort | None = None
    smtp_tls: Literal["implicit", "starttls"] = "implicit"
    ca_file: Path | None = None
    sasl: Literal["xoauth2", "oauthbearer"] = "xoauth2"
    flow: Flow = "authorization_code"
    authorize_url: str | None = None
    token_url: str
    device_url: str | None = None
    scopes: list[str] = Field(default_factory=list)
    client_id: str | None = None
    client_secret: SecretStr | None = None
    tenant: str | None = None
    # Google service accounts: the JSON key file; signed JWT assertions (RFC 7523).
    service_account_key_file: Path | None = None
    # Opt-in unattended mode: a daemon-held key file seals this provider's secrets instead of
    # the user's local password (see docs/security.md for the trade-off).
    key_file: Path | None = None
    # Extra authorize-URL parameters (e.g. access_type=offline, prompt=consent for Google).
    authorize_params: dict[str, str] = Field(default_factory=dict)
    # Outbound proxies; each defaults to the same key of [network] (an empty string: none).
    https_proxy: ProxyURL = None
    trust_env: bool = False
    upstream_proxy: ProxyURL = None

    @property
    def imap_host(self) -> str:
        return parse_hostport(self.imap)[0]

    @property
    def imap_port(self) -> int:
        return parse_hostport(self.imap)[1]

    @property
    def smtp_host(self) -> str:
        return parse_hostport(self.smtp or "", what="smtp")[0]

    @property
    def smtp_port(self) -> int:
        return parse_hostport(self.smtp or "", what="smtp")[1]

    @model_validator(mode="after")
    def _flow_needs(self) -> "ProviderConfig":
        problems = []
        if self.flow == "authorization_code" and not self.authorize_url:
            problems.append("flow 'authorization_code' needs authorize_url")
        if self.flow == "device" and not self.device_url:
            problems.append("flow 'device' needs device_url")
        if self.flow == "service_account" and not self.service_account_key_file:
            problems.append("flow 'service_account' needs service_account_key_file")
        if self.flow != "service_account" and not self.client_id:
            problems.append(f"flow {self.flow!r} needs client_id")
        if self.flow == "client_credentials" and self.client_secret is None:
            problems.append("flow 'client_credentials' needs client_secret")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class UserConfig(_Section):
    name: str
    provider: str
    upstream_user: str
    pop3_mailbox: str = "INBOX"
    pop3_delete: Literal["expunge", "trash", "keep"] = "expunge"
    # SMTP: envelope senders allowed besides upstream_user (aliases the mailbox may send as).
    send_as: list[str] = Field(default_factory=list)


class Limits(_Section):
    """Every limit and timeout mailgate applies; see docs/configuration.md for why each exists."""

    # Timeouts (seconds).
    login_timeout: float = Field(180, gt=0)  # idle time allowed before a client logs in
    imap_idle_timeout: float = Field(1800, ge=1800)  # RFC 3501 §5.4: at least 30 minutes
    pop3_idle_timeout: float = Field(600, ge=600)  # RFC 1939: at least 10 minutes
    tls_handshake_timeout: float = Field(30, gt=0)
    proxy_header_timeout: float = Field(5, gt=0)  # a load balancer's PROXY header, after accept
    upstream_connect_timeout: float = Field(30, gt=0)
    upstream_command_timeout: float = Field(120, gt=0)
    token_request_timeout: float = Field(30, gt=0)
    shutdown_grace: float = Field(30, ge=0)
    logout_timeout: float = Field(5, gt=0)  # a session's polite goodbye to the upstream
    # Sizes (bytes).
    max_line_prelogin: int = Field(8192, ge=512)
    max_line: int = Field(65536, ge=1024)
    max_literal_prelogin: int = Field(8192, ge=512)
    max_literal: int = Field(104_857_600, ge=1024)
    max_proxy_header: int = Field(4096, ge=232)  # PROXY v2 with its extensions
    # Abuse.
    max_bad_commands_prelogin: int = Field(3, ge=1)
    max_bad_commands: int = Field(20, ge=1)
    auth_failure_delay: float = Field(2.0, ge=0)
    max_connections: int = Field(1000, ge=1)
    max_connections_per_ip: int = Field(100, ge=1)
    kdf_concurrency: int = Field(2, ge=1)
    kdf_queue_length: int = Field(64, ge=1)  # logins from unremembered addresses waiting for it
    trusted_address_days: float = Field(30, gt=0)  # sliding memory of a user's good addresses
    admin_connections_per_ip: int = Field(8, ge=1)
    admin_request_timeout: float = Field(5, gt=0)  # to send a whole admin request head + body
    admin_websockets: int = Field(16, ge=1)  # /events streams at once (4 per address at most)
    admin_websocket_ping: float = Field(30, gt=0)  # an /events client must answer a ping within
    # Upstream.
    upstream_connections_per_account: int = Field(10, ge=1)
    upstream_slot_wait: float = Field(30, ge=0)
    # Notifications ([notify]).
    notify_queue: int = Field(100, ge=1)  # notifications waiting for delivery; more are dropped
    notify_command_timeout: float = Field(10, gt=0)  # the notify command is killed after this
    notify_webhook_timeout: float = Field(10, gt=0)  # one webhook POST
    notify_webhook_attempts: int = Field(5, ge=1)  # POSTs per notification before giving up
    notify_webhook_backoff: float = Field(2, ge=0)  # first retry delay; doubles each time
    # SMTP submission (docs/smtp.md).
    smtp_max_message_size: int = Field(52_428_800, ge=1024)  # the upstream's SIZE if smaller
    smtp_max_recipients: int = Field(100, ge=1)  # per message
    smtp_messages_per_session: int = Field(100, ge=1)
    smtp_messages_per_user_per_hour: int = Field(300, ge=1)
    smtp_upstream_connections_per_account: int = Field(3, ge=1)  # apart from IMAP's
    smtp_command_timeout: float = Field(300, gt=0)  # RFC 5321 §4.5.3.2.7: at least 5 minutes
    smtp_data_timeout: float = Field(600, gt=0)  # a DATA/BDAT block, and the upstream's answer to it
    # The PostgreSQL store ([store] url).
    store_connections: int = Field(10, ge=2)  # pooled connections per instance
    store_timeout: float = Field(10, gt=0)  # waiting for a pooled connection / connecting
    upstream_pool_size: int = Field(2, ge=0)  # idle logged-in connections kept per account
    upstream_pool_idle: float = Field(300, gt=0)  # seconds one may stay idle in the pool
    # [server] workers > 1: seconds between the figures each worker reports to the admin port.
    worker_report_interval: float = Field(2, gt=0)


class Config(_Section):
    path: Path | None = None
    server: ServerSection = ServerSection()
    store: StoreSection = StoreSection()
    tls: TLSSection = TLSSection()
    logging: LoggingSection = LoggingSection()
    listeners: list[ListenerConfig] = Field(default_factory=list, alias="listener")
    admin: AdminSection = AdminSection()
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    limits: Limits = Limits()
    network: NetworkSection = NetworkSection()
    notify: NotifySection = NotifySection()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def provider_for(self, user: UserConfig) -> ProviderConfig:
        return self.providers[user.provider]


# ---------------------------------------------------------------------------------------------
# Loading


# The [network] keys every provider inherits unless its own table sets them.
NETWORK_PROVIDER_KEYS = ("https_proxy", "trust_env", "upstream_proxy")


def _merge_providers(raw: dict[str, Any], problems: list[str]) -> None:
    presets = PRESETS
    network = raw.get("network")
    inherited = (
        {k: network[k] for k in NETWORK_PROVIDER_KEYS if k in network}
        if isinstance(network, dict) else {}
    )
    providers = raw.get("providers")
    if providers is None:
        return
    if not isinstance(providers, dict):
        problems.append("providers: must be a table of [providers.NAME] tables")
        raw.pop("providers")
        return
    for name, table in list(providers.items()):
        if not isinstance(table, dict):
            problems.append(f"providers.{name}: must be a table")
            continue
        preset_name = table.get("preset", name if name in presets else None)
        base: dict[str, Any] = {}
        if preset_name is not None:
            if preset_name not in presets:
                problems.append(
                    f"providers.{name}.preset: unknown preset {preset_name!r} "
                    f"(built in: {', '.join(sorted(presets)) or 'none'})"
                )
            else:
                base = dict(presets[preset_name])
                base["preset"] = preset_name
        merged = {**base, **inherited, **table, "name": name}
        tenant = merged.get("tenant")
        for key in ("authorize_url", "token_url", "device_url"):
            url = merged.get(key)
            if isinstance(url, str) and "{tenant}" in url:
                merged[key] = url.replace("{tenant}", str(tenant or "organizations"))
        providers[name] = merged


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    providers = {
        name: p.model_copy(
            update={
                "ca_file": fix(p.ca_file),
                "service_account_key_file": fix(p.service_account_key_file),
                "key_file": fix(p.key_file),
            }
        )
        for name, p in cfg.providers.items()
    }
    return cfg.model_copy(
        update={
            "server": cfg.server.model_copy(update={"state_dir": fix(cfg.server.state_dir)}),
            "tls": cfg.tls.model_copy(
                update={"cert_file": fix(cfg.tls.cert_file), "key_file": fix(cfg.tls.key_file)}
            ),
            "providers": providers,
        }
    )


def _format_loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            # Listeners are written [[listener]] in TOML: show listener[1], counting from 1.
            parts[-1:] = [f"{parts[-1]}[{item + 1}]"] if parts else [f"[{item + 1}]"]
        elif item in ("function-after", "function-before") or str(item).startswith(
            ("function-", "union[", "constrained-")
        ):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _format_error(err: ErrorDetails, raw: dict[str, Any]) -> str:
    loc = _format_loc(tuple(err["loc"]), raw)
    msg = err["msg"]
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see mailgate.example.toml)"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    if isinstance(got, (str, int, float, bool)) and repr(got) not in msg:
        return f"{loc}: {msg} (got {got!r})"
    return f"{loc}: {msg}"


def parse_config(raw: dict[str, Any], *, base_dir: Path, path: Path | None = None) -> Config:
    """Validate an already-parsed TOML document. Raises ConfigError with every problem."""
    raw = _deep_copy(raw)
    problems: list[str] = []
    _merge_providers(raw, problems)
    users = raw.get("users")
    if isinstance(users, dict):
        for name, table in users.items():
            if isinstance(table, dict):
                table["name"] = name
    problems.extend(_check_user_providers(raw))
    try:
        cfg = Config.model_validate({**raw, "path": path})
    except ValidationError as exc:
        problems.extend(_format_error(e, raw) for e in exc.errors())
        raise ConfigError(_dedupe(problems)) from None
    problems.extend(_cross_check(cfg))
    if problems:
        raise ConfigError(_dedupe(problems))
    return _resolve_paths(cfg, base_dir)


def _cross_check(cfg: Config) -> list[str]:
    problems = []
    seen: dict[tuple[str, int], int] = {}
    for i, lst in enumerate(cfg.listeners, 1):
        key = (lst.host, lst.port)
        if key in seen and lst.port != 0:  # port 0: the OS picks a free port for each
            problems.append(
                f"listener[{i}].bind: {lst.bind} is already used by listener[{seen[key]}]"
            )
        seen[key] = i
        if lst.tls == "none" and not lst.plaintext_auth_from:
            pass  # allowed: such a listener only lets in clients that cannot log in; warned at start
        if lst.relay_user is not None and lst.relay_user not in cfg.users:
            problems.append(f"listener[{i}].relay_user: {lst.relay_user!r} is not a [users.X] name")
    if cfg.admin.enabled and cfg.admin.port != 0 and (cfg.admin.host, cfg.admin.port) in seen:
        problems.append(f"admin.bind: {cfg.admin.bind} is also a listener's address")
    return problems


def _check_user_providers(raw: dict[str, Any]) -> list[str]:
    """Users naming an undefined provider (checked on the raw document, so that this problem
    is reported together with every other one)."""
    providers = raw.get("providers")
    users = raw.get("users")
    if not isinstance(providers, dict):
        providers = {}
    if not isinstance(users, dict):
        users = {}
    problems = []
    for name, table in users.items():
        provider = table.get("provider") if isinstance(table, dict) else None
        if isinstance(provider, str) and provider not in providers:
            defined = ", ".join(sorted(providers)) or "none defined"
            problems.append(
                f"users.{name}.provider: unknown provider {provider!r} "
                f"(define [providers.{provider}]; defined: {defined})"
            )
    return problems


def per_worker(config: Config) -> Config:
    """The configuration one of ``server.workers`` processes runs with: the caps that must hold
    for the whole gateway are divided among the workers (docs/security.md, "Several worker
    processes"); one worker: unchanged."""
    n = config.server.worker_count
    if n == 1:
        return config
    limits = config.limits
    shares = {key: max(1, getattr(limits, key) // n) for key in WORKER_DIVIDED_LIMITS}
    return config.model_copy(update={"limits": limits.model_copy(update=shares)})


#: The limits each of N worker processes gets 1/N of (at least 1).
WORKER_DIVIDED_LIMITS = ("max_connections", "max_connections_per_ip", "kdf_concurrency",
                         "upstream_connections_per_account")


def load_config(path: str | Path) -> Config:
    """Read and validate the config file. Raises ConfigError (never a traceback for bad input)."""
    path = Path(path).expanduser().absolute()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (start from mailgate.example.toml, or pass --config PATH)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, base_dir=path.parent, path=path)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))

