"""The IMAP front end: mailgate's own pre-login dialogue, the login, then the relay.

Theory of operation
-------------------
``handle_imap(stream, ctx)`` runs one client connection (the server has already done implicit
TLS and closes the stream afterwards, whatever happens here).

Before login mailgate answers everything itself, from the sans-IO
:class:`~gateway.protocol.imap_commands.CommandReader`: the greeting carries mailgate's own
capabilities (``STARTTLS`` on a STARTTLS listener before TLS, ``AUTH=PLAIN``/``AUTH=LOGIN`` only
where a password may be sent, ``LOGINDISABLED`` where it may not); CAPABILITY, NOOP, LOGOUT, ID,
STARTTLS, LOGIN and AUTHENTICATE PLAIN/LOGIN are served; anything else is ``BAD``. The whole
pre-login phase must end within ``limits.login_timeout``; more than
``limits.max_bad_commands_prelogin`` bad commands, or as many failed logins, end the connection.

A login checks the local password (``ctx.accounts.login``: unknown user and wrong password give
the same answer after the same delay) and opens the upstream session (``ctx.connector.open``, a
:class:`gateway.ports.UpstreamConnector`). The errors map to the client's answer:

==========================  ===============================================================
``AuthenticationFailed``    ``NO [AUTHENTICATIONFAILED]``
``ReauthorizationRequired`` ``* NO [ALERT] <contact your administrator>`` + ``NO
                            [AUTHENTICATIONFAILED]``; the log names ``mailgate authorize``
``TemporaryFailure``        ``NO [UNAVAILABLE]``
==========================  ===============================================================

On success the client gets ``OK [CAPABILITY …]`` with the upstream's post-login capabilities as
the relay will show them, and the connection is handed to :mod:`gateway.frontends.imap_relay`,
together with any bytes the client pipelined after its login command.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..errors import AuthenticationFailed, ReauthorizationRequired, TemporaryFailure
from ..net import ClientStream, TLSHandshakeFailed
from ..protocol import sasl
from ..protocol.imap_commands import (
    NEED_DATA,
    BadCommand,
    Command,
    CommandReader,
    ContinuationLine,
    LiteralContinue,
    ProtocolError,
    astring,
    bye,
    capability_response,
    continuation,
    greeting,
    id_response,
    prelogin_capabilities,
    tagged,
)
from ..protocol.imap_passthrough import client_capabilities
from .imap_relay import ImapRelay

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..ports import LocalAccount
    from ..upstream.client import UpstreamIMAP

log = logging.getLogger("mailgate.imap")

#: What ``ID`` answers (RFC 2971); no version details beyond the release.
SERVER_ID = {"name": "mailgate", "version": __version__}
#: Longest a farewell (``* BYE``) may take to write to a client that stopped reading.
FAREWELL_TIMEOUT = 5.0
#: The ``[ALERT]`` shown to a user whose upstream grant needs renewing (the log names the fix).
REAUTHORIZE_ALERT = "Your mail account must be authorized again: please contact your administrator."

UNAVAILABLE = "Mail server temporarily unavailable, try again later."
UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism."
PRIVACY_REQUIRED = "Plaintext authentication is not allowed without TLS: use STARTTLS."
#: The same refusal on a listener without TLS (``tls = "none"``), which offers no STARTTLS.
PRIVACY_REQUIRED_NO_TLS = (
    "Plaintext authentication is not allowed without TLS: this port offers no TLS."
)


def _auth_failed(tag: bytes) -> bytes:
    """The one answer for an unknown user, a wrong password and a dead grant alike."""
    return tagged(tag, "NO", "Authentication failed.", code="AUTHENTICATIONFAILED")


async def handle_imap(stream: ClientStream, ctx: "GatewayContext") -> None:
    """Serve one IMAP client connection from greeting to close."""
    logged_in = await PreLogin(stream, ctx).run()
    if logged_in is None:
        return
    try:
        relay = ImapRelay(
            stream,
            logged_in.upstream,
            limits=ctx.config.limits,
            client_buffered=logged_in.pipelined,
            user=logged_in.account.name,
            give_back=_give_back(ctx),
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await logged_in.upstream.aclose()
        raise
    stream.outcome = await relay.run()


def _give_back(ctx: "GatewayContext") -> Callable[["UpstreamIMAP"], Awaitable[None]] | None:
    """How the relay returns a clean connection after the client's LOGOUT: to the pool."""
    if ctx.config.limits.upstream_pool_size == 0:
        return None
    return functools.partial(ctx.connector.release, clean=True)


@dataclass
class LoggedIn:
    account: "LocalAccount"
    upstream: "UpstreamIMAP"
    pipelined: bytes  # client bytes received after the login command


class _SessionOver(Exception):
    """End the pre-login dialogue (after the farewell, if any, was sent)."""


class PreLogin:
    """The dialogue before login, answered by mailgate itself."""

    def __init__(self, stream: ClientStream, ctx: "GatewayContext"):
        self.stream = stream
        self.ctx = ctx
        self.limits = ctx.config.limits
        self.reader = CommandReader(
            max_line=self.limits.max_line_prelogin, max_literal=self.limits.max_literal_prelogin
        )
        self.bad_commands = 0
        self.failed_logins = 0

    # -- capabilities and output

    @property
    def starttls_offered(self) -> bool:
        return self.stream.listener.tls == "starttls" and not self.stream.tls_active

    def capabilities(self) -> list[str]:
        return prelogin_capabilities(
            starttls=self.starttls_offered, login_allowed=self.stream.plaintext_auth_allowed()
        )

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def farewell(self, text: str, outcome: str) -> None:
        """Send ``* BYE text`` if the client still listens, and end the dialogue."""
        self.stream.outcome = outcome
        with trio.move_on_after(FAREWELL_TIMEOUT):
            try:
                await self.send(bye(text))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        raise _SessionOver

    # -- main loop

    async def run(self) -> LoggedIn | None:
        try:
            await self.send(greeting(self.capabilities()))
            with trio.move_on_after(self.limits.login_timeout):
                return await self._dialogue()
            await self.farewell("Disconnected for inactivity.", "timeout")
        except _SessionOver:
            pass
        return None

    async def _dialogue(self) -> LoggedIn | None:
        while True:
            event = await self._next_event()
            if isinstance(event, LiteralContinue):
                await self.send(continuation("Ready for literal data"))
            elif isinstance(event, BadCommand):
                await self._bad(event.tag, event.reason)
            elif isinstance(event, Command):
                logged_in = await self._command(event)
                if logged_in is not None:
                    return logged_in
            # ContinuationLine only comes when asked for (AUTHENTICATE), see _read_answer

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.reader.next_event()
            except ProtocolError as exc:
                await self.farewell(f"{str(exc).capitalize()}.", "protocol_error")
            if event is not NEED_DATA:
                return event
            data = await self.stream.receive_some()
            if not data:
                self.stream.outcome = "client_gone"
                raise _SessionOver
            self.reader.receive_data(data)

    async def _bad(self, tag: bytes | None, reason: str) -> None:
        self.bad_commands += 1
        await self.send(tagged(tag or b"*", "BAD", reason[:1].upper() + reason[1:] + "."))
        if self.bad_commands >= self.limits.max_bad_commands_prelogin:
            await self.farewell("Too many invalid commands.", "bad_commands")

    async def _command(self, cmd: Command) -> LoggedIn | None:
        handler = _HANDLERS.get(cmd.name)
        if handler is None:
            what = "Unknown command" if cmd.name not in _AFTER_LOGIN else "Log in first"
            await self._bad(cmd.tag, f"{what}: {cmd.name.decode('ascii', 'replace')}")
            return None
        return await handler(self, cmd)

    # -- commands

    async def _capability(self, cmd: Command) -> None:
        caps = capability_response(self.capabilities())
        await self.send(caps + tagged(cmd.tag, "OK", "Capability completed."))

    async def _noop(self, cmd: Command) -> None:
        await self.send(tagged(cmd.tag, "OK", "NOOP completed."))

    async def _logout(self, cmd: Command) -> None:
        self.stream.outcome = "logout"
        await self.send(bye("Logging out.") + tagged(cmd.tag, "OK", "Logout completed."))
        raise _SessionOver

    async def _id(self, cmd: Command) -> None:
        await self.send(id_response(SERVER_ID) + tagged(cmd.tag, "OK", "ID completed."))

    async def _starttls(self, cmd: Command) -> None:
        if not self.starttls_offered:
            reason = "TLS is already active"
            if not self.stream.tls_active:
                reason = "STARTTLS is not offered here"
            await self._bad(cmd.tag, reason)
            return
        await self.send(tagged(cmd.tag, "OK", "Begin TLS negotiation now."))
        self.reader.discard_buffer()  # plaintext sent after STARTTLS must never run
        try:
            await self.stream.start_tls()
        except TLSHandshakeFailed as exc:
            log.info("imap %s: %s", self.stream.peer, exc)
            self.stream.outcome = "tls_failed"
            raise _SessionOver from None

    async def _login(self, cmd: Command) -> LoggedIn | None:
        if len(cmd.args) != 2 or astring(cmd.args[0]) is None or astring(cmd.args[1]) is None:
            await self._bad(cmd.tag, "LOGIN expects a user name and a password")
            return None
        if not await self._password_allowed(cmd.tag):
            return None
        user, password = astring(cmd.args[0]), astring(cmd.args[1])
        assert user is not None and password is not None
        return await self._log_in(cmd.tag, _text(user), _text(password))

    async def _authenticate(self, cmd: Command) -> LoggedIn | None:
        if not cmd.args or len(cmd.args) > 2 or any(astring(a) is None for a in cmd.args):
            await self._bad(cmd.tag, "AUTHENTICATE expects a mechanism")
            return None
        mechanism = bytes(cmd.args[0]).upper()  # type: ignore[arg-type]
        initial = astring(cmd.args[1]) if len(cmd.args) == 2 else None
        if mechanism not in (b"PLAIN", b"LOGIN"):
            await self.send(tagged(cmd.tag, "NO", UNSUPPORTED_MECHANISM, code="CANNOT"))
            return None
        if not await self._password_allowed(cmd.tag):
            return None
        exchange = self._sasl_plain if mechanism == b"PLAIN" else self._sasl_login
        try:
            credentials = await exchange(cmd.tag, initial)
        except sasl.SASLError as exc:
            await self._bad(cmd.tag, str(exc))
            return None
        if credentials is None:
            return None
        return await self._log_in(cmd.tag, *credentials)

    async def _sasl_plain(self, tag: bytes, initial: bytes | None) -> tuple[str, str] | None:
        """RFC 4616 PLAIN: one message, from SASL-IR or after an empty challenge."""
        answer = initial if initial is not None else await self._read_answer(tag, b"")
        if answer is None:
            return None
        creds = sasl.decode_plain(answer)
        if creds.authzid and creds.authzid != creds.authcid:
            await self.send(tagged(tag, "NO", "Cannot act as another user.", "AUTHORIZATIONFAILED"))
            return None
        return creds.authcid, creds.password

    async def _sasl_login(self, tag: bytes, initial: bytes | None) -> tuple[str, str] | None:
        """The LOGIN mechanism: user name (or SASL-IR), then password, each after a challenge."""
        first = initial
        if first is None:
            first = await self._read_answer(tag, sasl.LOGIN_USERNAME_CHALLENGE)
            if first is None:
                return None
        user = sasl.decode_login_step(first)
        second = await self._read_answer(tag, sasl.LOGIN_PASSWORD_CHALLENGE)
        if second is None:
            return None
        return user, sasl.decode_login_step(second)

    async def _read_answer(self, tag: bytes, challenge: bytes) -> bytes | None:
        """Send a SASL challenge and read the answer line; ``None`` if the client cancelled."""
        await self.send(continuation(challenge))
        self.reader.expect_continuation_line()
        event = await self._next_event()
        assert isinstance(event, ContinuationLine)
        if event.data.strip() == b"*":
            await self.send(tagged(tag, "BAD", "Authentication cancelled."))
            return None
        return event.data

    async def _password_allowed(self, tag: bytes) -> bool:
        if self.stream.plaintext_auth_allowed():
            return True
        self._publish_failure("-", "plaintext_refused")
        text = PRIVACY_REQUIRED if self.starttls_offered else PRIVACY_REQUIRED_NO_TLS
        await self.send(tagged(tag, "NO", text, code="PRIVACYREQUIRED"))
        return False

    # -- the login itself

    async def _log_in(self, tag: bytes, username: str, password: str) -> LoggedIn | None:
        account = None
        try:
            account = await self.ctx.accounts.login(username, password, peer=self.stream.peer_host)
            upstream = await self.ctx.connector.open(account)
        except AuthenticationFailed:
            self._publish_failure(username, "bad_credentials")
            log.info("imap %s: login failed for %r", self.stream.peer, username)
            await self.send(_auth_failed(tag))
            await self._count_failed_login()
            return None
        except ReauthorizationRequired as exc:
            self._publish_failure(username, "reauthorization_required")
            log.warning("imap %s: %s", self.stream.peer, exc)
            await self.send(tagged(b"*", "NO", REAUTHORIZE_ALERT, code="ALERT") + _auth_failed(tag))
            await self._count_failed_login()
            return None
        except TemporaryFailure as exc:
            self._publish_failure(username, "temporary")
            who = account.name if account is not None else username
            log.warning("imap %s: login of %r failed for now: %s", self.stream.peer, who, exc)
            await self.send(tagged(tag, "NO", UNAVAILABLE, code="UNAVAILABLE"))
            return None
        try:
            caps = client_capabilities(_ordered(upstream.capabilities))
            await self.send(tagged(tag, "OK", "Logged in.", "CAPABILITY " + " ".join(caps)))
        except BaseException:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        self.stream.user = account.name
        self._publish("session.authenticated", user=account.name)
        log.info("imap %s: %s logged in", self.stream.peer, account.name)
        return LoggedIn(account=account, upstream=upstream, pipelined=self.reader.take_buffered())

    async def _count_failed_login(self) -> None:
        self.failed_logins += 1
        if self.failed_logins >= self.limits.max_bad_commands_prelogin:
            await self.farewell("Too many failed logins.", "auth_failed")
        return None

    def _publish_failure(self, user: str, reason: str) -> None:
        self._publish("login.failed", user=user, reason=reason)

    def _publish(self, kind: str, **fields: str) -> None:
        event = {"type": kind, "protocol": "imap", "peer": self.stream.peer, **fields}
        self.ctx.events.publish(event)


# The commands answered before login, each with the section defining it (RFC 9051, the same
# numbers in RFC 3501).
_HANDLERS = {
    b"CAPABILITY": PreLogin._capability,  # RFC 9051 §6.1.1
    b"NOOP": PreLogin._noop,  # RFC 9051 §6.1.2
    b"LOGOUT": PreLogin._logout,  # RFC 9051 §6.1.3
    b"ID": PreLogin._id,  # RFC 2971 §3.1
    b"STARTTLS": PreLogin._starttls,  # RFC 9051 §6.2.1
    b"LOGIN": PreLogin._login,  # RFC 9051 §6.2.3
    b"AUTHENTICATE": PreLogin._authenticate,  # RFC 9051 §6.2.2 (SASL-IR: RFC 4959)
}
# Valid IMAP commands that need a login first (answered "Log in first" rather than "Unknown").
_AFTER_LOGIN = frozenset(
    b"SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND CHECK CLOSE"
    b" EXPUNGE SEARCH FETCH STORE COPY MOVE UID IDLE ENABLE NAMESPACE GETQUOTAROOT UNSELECT".split()
)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _ordered(capabilities: frozenset[str] | set[str] | list[str]) -> list[str]:
    """Upstream capabilities in a stable order, IMAP4rev1/IMAP4rev2 first."""
    caps = list(capabilities) if isinstance(capabilities, list) else sorted(capabilities)
    first = [c for c in caps if c.upper() in ("IMAP4REV1", "IMAP4REV2")]
    return first + [c for c in caps if c not in first]

