"""The upstream SMTP client: a logged-in connection to the provider's submission server.

Theory of operation
-------------------
:func:`open_smtp` is what the SMTP connector (:mod:`gateway.upstream.smtp_connector`) calls
when a submission session needs to send:

1. take a slot of the account's SMTP cap (``limits.smtp_upstream_connections_per_account``,
   :mod:`gateway.upstream.slots`; apart from the IMAP cap); it is released when the
   connection is closed;
2. :func:`connect_smtp`: TCP, verified TLS (implicit, or ``STARTTLS`` after a first EHLO,
   RFC 3207), the ``220`` greeting and ``EHLO`` -- within ``limits.upstream_connect_timeout``;
3. ``AUTH XOAUTH2`` or ``AUTH OAUTHBEARER`` (the provider's ``sasl``) with the account's access
   token as initial response (RFC 4954 §4);
4. a ``334`` challenge carries the provider's JSON error (``{"status":"401",...}``): the client
   answers it (empty line for XOAUTH2, ``^A`` for OAUTHBEARER) and reads the final ``535``.
   The final answer is classified by :func:`gateway.upstream.smtp_answers.explain`: a rejected
   token (``535 5.7.8``, ``535 5.7.3``, or any 5xx after a JSON challenge whose status says the
   token is bad) → one fresh token (``access_token(force_refresh=True)``) and one more
   attempt, then :class:`~gateway.errors.ReauthorizationRequired`; a temporary answer →
   :class:`SmtpTemporary`; anything else → :class:`SmtpRefused` (permanent), each with the
   table's advice.

:class:`UpstreamSMTP` then relays a transaction: :meth:`~UpstreamSMTP.command` sends one line
and returns the :class:`~gateway.protocol.smtp.Reply`; :meth:`~UpstreamSMTP.send_data` writes
message octets as the client sent them (the front end finds their end); :meth:`abort` closes
the connection at once -- the way to make sure a half-relayed message is never completed.
Every wait is bounded (``limits.upstream_command_timeout``, and ``limits.smtp_data_timeout``
for the answer to the data); a timeout, a closed connection or a reply that is not SMTP marks
the connection broken and raises :class:`~gateway.errors.UpstreamError`.

Neither tokens nor SASL messages nor message content are ever logged.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import MailgateError, ReauthorizationRequired, UpstreamError
from ..protocol import sasl
from ..protocol.smtp import Reply, ReplyError, ReplyParser
from .transport import make_tls_context, open_client, send_within, tls_handshake, wrap_tls
from .login import Publish
from .slots import Slot, UpstreamSlots
from .smtp_answers import SMTP_AUTH_DISABLED, Explanation, Meaning, explain

if TYPE_CHECKING:
    from ..config import Limits
    from ..ports import TokenSource

log = logging.getLogger("mailgate.smtp.upstream")

__all__ = ["SmtpRefused", "SmtpTemporary", "UpstreamSMTP", "connect_smtp", "open_smtp"]

RECEIVE_SIZE = 65536
#: The name mailgate gives in its EHLO to the provider.
EHLO_NAME = "mailgate"

class SmtpTemporary(UpstreamError):
    """The provider answered with a temporary failure (4xx); ``reply``/``explanation`` say which."""

    def __init__(self, message: str, reply: Reply | None = None,
                 explanation: Explanation | None = None) -> None:
        super().__init__(message)
        self.reply = reply
        self.explanation = explanation


class SmtpRefused(MailgateError):
    """The provider refused for good (5xx that a fresh token does not cure)."""

    def __init__(self, message: str, reply: Reply, explanation: Explanation | None = None) -> None:
        super().__init__(message)
        self.reply = reply
        self.explanation = explanation


class UpstreamSMTP:
    """One connection to a provider's SMTP server (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, *, where: str, command_timeout: float,
                 data_timeout: float) -> None:
        self._stream = stream
        self.where = where
        self._timeout = command_timeout
        self._data_timeout = data_timeout
        self._parser = ReplyParser()
        self._broken: str | None = None
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> its parameters
        self.slot: Slot | None = None
        self.messages = 0  # transactions completed on this connection

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        return self._broken is None

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE (RFC 1870), if it announced a number (0 means none)."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    def offers(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    def _fail(self, message: str) -> UpstreamError:
        self._broken = message
        return UpstreamError(message)

    # ------------------------------------------------------------------ I/O

    async def _send(self, data: bytes) -> None:
        if self._broken is not None:
            raise UpstreamError(f"{self.where}: connection unusable ({self._broken})")
        try:
            await send_within(self._stream, data, self._timeout, self.where)
        except UpstreamError as exc:
            raise self._fail(str(exc)) from None

    async def read_reply(self, *, timeout: float | None = None) -> Reply:
        """The server's next reply."""
        if self._broken is not None:
            raise UpstreamError(f"{self.where}: connection unusable ({self._broken})")
        limit = self._timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                while True:
                    parsed = self._parser.next_reply()
                    if parsed is not None:
                        return parsed
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise self._fail(f"{self.where} closed the connection")
                    self._parser.feed(data)
        except trio.TooSlowError:
            raise self._fail(f"{self.where} did not answer within {limit:g}s") from None
        except ReplyError as exc:
            raise self._fail(f"{self.where} sent something that is not SMTP: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            raise self._fail(f"{self.where} closed the connection ({type(exc).__name__})") from None

    async def command(self, line: str | bytes, *, timeout: float | None = None) -> Reply:
        """Send one command line (without CRLF) and return the reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        await self._send(data + b"\r\n")
        return await self.read_reply(timeout=timeout)

    async def send_data(self, data: bytes) -> None:
        """Message octets as the client sent them (DATA with its stuffing, or a BDAT chunk)."""
        if data:
            await self._send(data)

    async def data_reply(self) -> Reply:
        """The answer to the message data (bounded by ``limits.smtp_data_timeout``)."""
        reply = await self.read_reply(timeout=self._data_timeout)
        if reply.positive:
            self.messages += 1
        return reply

    async def ehlo(self, name: str = EHLO_NAME) -> Reply:
        reply = await self.command(f"EHLO {name}")
        if reply.code != 250:
            raise self._fail(f"{self.where} refused EHLO: {reply}")
        extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            extensions[keyword.upper()] = params
        self.extensions = extensions
        return reply

    async def starttls(self, tls: ssl.SSLContext, server_hostname: str) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise self._fail(f"{self.where} refused STARTTLS: {reply}")
        if self._parser.buffered:
            raise self._fail(f"{self.where} sent data after STARTTLS before the TLS handshake")
        self._stream = wrap_tls(self._stream, tls, server_hostname)
        await self._handshake()
        self._parser = ReplyParser()

    async def _handshake(self) -> None:
        try:
            await tls_handshake(self._stream, self._timeout, self.where)
        except UpstreamError as exc:
            raise self._fail(str(exc)) from None

    async def authenticate(self, mechanism: str, initial: bytes, error_reply: bytes) -> tuple[Reply, bytes | None]:
        """One ``AUTH`` with an initial response; returns the final reply and any challenge."""
        reply = await self.command(b"AUTH " + mechanism.upper().encode() + b" " + initial)
        challenge = None
        if reply.code == 334:
            challenge = (reply.lines[0] if reply.lines else "").encode("ascii", "replace")
            reply = await self.command(error_reply)
        return reply, challenge

    async def reset(self) -> bool:
        """``RSET`` (RFC 5321 §4.1.1.5) after an aborted transaction; False if it failed."""
        try:
            return (await self.command("RSET")).code == 250
        except UpstreamError:
            return False

    async def quit(self, timeout: float) -> None:
        """A polite ``QUIT``, then close."""
        with trio.move_on_after(timeout):
            try:
                await self.command("QUIT")
            except UpstreamError:
                pass
        await self.aclose()

    async def abort(self) -> None:
        """Close at once: a message whose data was half sent is never completed."""
        self._broken = self._broken or "aborted"
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (after QUIT, or to abort: no TLS goodbye is waited for) and
        give the slot back."""
        self._broken = self._broken or "closed"
        try:
            await trio.aclose_forcefully(self._stream)
        finally:
            if self.slot is not None:
                self.slot.release()


async def connect_smtp(host: str, port: int, *, tls: str, ca_file: Path | None, connect_timeout: float,
                       command_timeout: float, data_timeout: float,
                       proxy: str | None = None) -> UpstreamSMTP:
    """Connect (through the ``proxy`` CONNECT tunnel if one is set), verify TLS, read the
    greeting and EHLO (see the module docstring, step 2)."""
    where = f"{host}:{port}"
    tls_ctx = make_tls_context(ca_file)

    def make(stream: trio.abc.Stream) -> UpstreamSMTP:
        return UpstreamSMTP(stream, where=where, command_timeout=command_timeout,
                            data_timeout=data_timeout)

    async def setup(client: UpstreamSMTP) -> None:
        if tls == "implicit":
            await client._handshake()
        greeting = await client.read_reply()
        if greeting.code != 220:
            raise client._fail(f"{where} is not ready: {greeting}")
        await client.ehlo()
        if tls == "starttls":
            if not client.offers("STARTTLS"):
                raise client._fail(f"{where} does not offer STARTTLS")
            await client.starttls(tls_ctx, host)
            await client.ehlo()

    return await open_client(host, port, tls=tls, tls_ctx=tls_ctx, proxy=proxy,
                             connect_timeout=connect_timeout, make=make, setup=setup)


def _initial_response(account: TokenSource, token: str) -> bytes:
    provider = account.provider
    if provider.sasl == "oauthbearer":
        message = sasl.oauthbearer_initial_response(account.upstream_user, token,
                                                     provider.smtp_host, provider.smtp_port)
    else:
        message = sasl.xoauth2_initial_response(account.upstream_user, token)
    return sasl.b64encode(message)


def _token_rejected(reply: Reply, challenge: bytes | None, explained: Explanation | None) -> bool:
    if explained is not None:
        return explained.meaning is Meaning.TOKEN_REJECTED
    if challenge is not None and reply.code >= 500:
        try:
            return sasl.decode_oauth_error(challenge).token_rejected
        except sasl.SASLError:
            return True
    return reply.code == 535


async def _log_in(client: UpstreamSMTP, account: TokenSource) -> None:
    provider = account.provider
    for attempt in (1, 2):
        token = await account.access_token(force_refresh=attempt == 2)
        try:
            initial = _initial_response(account, token)
        except sasl.SASLError as exc:
            raise ReauthorizationRequired(account.name, f"cannot send this user or token upstream: {exc}") from None
        reply, challenge = await client.authenticate(provider.sasl, initial,
                                                     sasl.oauth_error_reply(provider.sasl))
        if reply.code == 235:
            log.info("%s: logged in to SMTP as %s (attempt %d)", client.where, account.upstream_user, attempt)
            return
        explained = explain(reply)
        advice = f" -- {explained.advice}" if explained else ""
        log.warning("%s: SMTP login of %s refused: %s%s", client.where, account.upstream_user, reply, advice)
        if _token_rejected(reply, challenge, explained):
            continue
        if reply.transient or (explained is not None and explained.meaning is Meaning.TEMPORARY):
            raise SmtpTemporary(f"{client.where} cannot log {account.upstream_user} in right now: {reply}",
                                reply, explained)
        raise SmtpRefused(f"{client.where} refused the login of {account.upstream_user}: {reply}",
                          reply, explained)
    raise ReauthorizationRequired(account.name, f"{client.where} rejected a freshly refreshed token "
                                  "for SMTP (re-authorize to send)")


async def open_smtp(account: TokenSource, limits: Limits, *, slots: UpstreamSlots | None = None,
                    publish: Publish | None = None) -> UpstreamSMTP:
    """A logged-in upstream SMTP connection for ``account`` (see the module docstring).

    Raises :class:`~gateway.errors.ReauthorizationRequired`, :class:`SmtpTemporary` /
    :class:`~gateway.errors.UpstreamError` / :class:`~gateway.errors.TemporaryFailure`,
    :class:`SmtpRefused` or, from ``account.access_token``, ``AuthenticationFailed``.
    """
    provider = account.provider
    if provider.smtp is None:
        raise UpstreamError(f"provider {provider.name!r} has no SMTP server (set smtp = \"host:port\")")
    started = trio.current_time()
    slot = await slots.acquire() if slots is not None else None
    try:
        client = await connect_smtp(
            provider.smtp_host, provider.smtp_port, tls=provider.smtp_tls, ca_file=provider.ca_file,
            proxy=provider.upstream_proxy, connect_timeout=limits.upstream_connect_timeout,
            command_timeout=limits.upstream_command_timeout, data_timeout=limits.smtp_data_timeout,
        )
    except BaseException as exc:
        if slot is not None:
            slot.release()
        _publish_error(publish, account, exc)
        raise
    client.slot = slot
    try:
        await _log_in(client, account)
    except BaseException as exc:
        await client.aclose()
        _publish_error(publish, account, exc)
        raise
    if publish is not None:
        publish({"type": "upstream.connected", "protocol": "smtp", "user": account.name,
                 "upstream": provider.smtp,
                 "latency_ms": round((trio.current_time() - started) * 1000, 1)})
    return client


def _publish_error(publish: Publish | None, account: TokenSource, exc: BaseException) -> None:
    if publish is None or not isinstance(exc, MailgateError):
        return
    if isinstance(exc, ReauthorizationRequired):
        reason = "reauthorization_required"
    elif isinstance(exc, SmtpRefused):
        reason = exc.explanation.key if exc.explanation else "refused"
    elif isinstance(exc, SmtpTemporary) and exc.explanation is not None:
        reason = exc.explanation.key
    else:
        reason = "temporary"
    event = {"type": "upstream.error", "protocol": "smtp", "user": account.name,
             "upstream": account.provider.smtp, "reason": reason}
    if isinstance(exc, SmtpRefused) and exc.explanation is not None \
            and exc.explanation.key == SMTP_AUTH_DISABLED:
        event["feature"] = "smtp"  # the provider refuses sending for the mailbox: notify once
    publish(event)
