"""The SMTP submission front end: one client connection, from greeting to QUIT.

Theory of operation
===================

:func:`handle_smtp` is the I/O driver around the sans-IO core (:mod:`gateway.protocol.smtp`):
it reads client bytes into a :class:`~gateway.protocol.smtp.CommandReader`, parses each line
against the session's RFC 5321 state and answers. The server closes the connection when it
returns. Rules, in the order a session meets them:

Greeting and EHLO (RFC 5321 §4.1.1.1, RFC 6409)
    EHLO lists SIZE (``limits.smtp_max_message_size``, or the provider's SIZE if smaller),
    8BITMIME, SMTPUTF8 and CHUNKING when the provider's server offers them (the extensions the
    SMTP connector last saw from it: a client's EHLO comes before mailgate knows its account),
    PIPELINING and ENHANCEDSTATUSCODES (mailgate's own), STARTTLS on ``starttls`` listeners
    before TLS, and ``AUTH PLAIN LOGIN`` only where passwords may be sent (over TLS or from the
    listener's ``plaintext_auth_from`` networks).

STARTTLS (RFC 3207)
    Everything the client sent after the STARTTLS line is discarded before the handshake
    (the command-injection class of bugs); the session starts over (EHLO again).

AUTH (RFC 4954)
    PLAIN (initial response or a ``334`` continuation) and LOGIN, checked with the user's
    local password by ``ctx.accounts.login`` -- the same throttling and brute-force defence as
    IMAP and POP3. ``*`` cancels. Refused before TLS (``538 5.7.11``) except from
    ``plaintext_auth_from`` networks.

Who may send, and as whom (docs/smtp.md)
    MAIL needs a successful AUTH, or a peer in the listener's ``relay_from`` networks, whose mail
    is sent as ``relay_user`` (``530 5.7.0`` otherwise: never an open relay). In both cases the
    envelope sender must be the account's ``upstream_user`` or one of its ``send_as``
    addresses, compared case-insensitively (``553 5.7.1`` otherwise); it is checked, never
    rewritten. Limits: ``limits.smtp_messages_per_session`` (``421 4.7.0`` and close),
    ``limits.smtp_messages_per_user_per_hour`` (``451 4.7.1``), ``limits.smtp_max_recipients``
    (``452 4.5.3``), the message size (``552 5.3.4``, from SIZE= at MAIL or while the data
    arrives).

Relaying (mailgate never accepts a message it has not handed on)
    The first MAIL opens the upstream connection (the SMTP connector: own per-account cap,
    token, one refresh); it is kept for the session's later transactions. MAIL, RCPT and DATA/
    BDAT go upstream as the client sent them, and the upstream's reply -- code, enhanced code,
    text -- goes back to the client unchanged, per recipient. The message data is streamed: the
    client's octets are relayed as received (dot-stuffing included) while
    :class:`~gateway.protocol.smtp.DataScanner` looks for their end, and the client gets the
    upstream's final reply, 250 only after the upstream's 250. If the client goes away, the
    data stalls for ``limits.smtp_data_timeout``, the message is too large or carries a
    bare-LF dot line, or the upstream fails mid-way, the upstream connection is closed without
    the end of data: the upstream never completes that message, and the client never sees 250.
    Failures to open the upstream: temporary (IdP or provider down, throttling) →
    ``451 4.7.0``/``4.4.1``; permanent (grant revoked, SMTP AUTH disabled, ...) → ``554 5.7.0``
    with the reason; each explained answer is logged with its advice and kept for the status
    page (:mod:`gateway.upstream.smtp_answers`).

Timeouts and abuse
    Waiting for a command: ``limits.login_timeout`` before AUTH, ``limits.smtp_command_timeout``
    after (``421 4.4.2`` and close). ``limits.max_bad_commands_prelogin`` /
    ``limits.max_bad_commands`` bad commands or failed logins close the connection.

One log line and one ``smtp.message`` event per message: user, recipients (accepted and
refused), size, the upstream's reply code, outcome -- never addresses or content. Passwords,
tokens and SASL data are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import trio

from ..config import in_networks
from ..errors import AuthenticationFailed, MailgateError, ReauthorizationRequired, TemporaryFailure
from ..protocol import sasl, smtp
from ..protocol.smtp import Command, Extensions, Reply, State
from ..upstream.smtp import SmtpRefused, SmtpTemporary, UpstreamSMTP
from ..upstream.smtp_answers import explain

if TYPE_CHECKING:
    from ..config import ListenerConfig, ProviderConfig
    from ..context import GatewayContext
    from ..net import ClientStream
    from ..ports import LocalAccount, SmtpConnector

log = logging.getLogger("mailgate.smtp")

#: A command handler of :class:`SmtpSession` (see ``SmtpSession.HANDLERS``).
Handler = Callable[["SmtpSession", Command], Awaitable[None]]

RECEIVE_SIZE = 65536
MECHANISMS = ("PLAIN", "LOGIN")


def _r(code: int, enhanced: str, text: str) -> bytes:
    return smtp.reply(code, text, enhanced)


OK = _r(250, "2.0.0", "OK")
AUTH_OK = _r(235, "2.7.0", "Authentication successful")
AUTH_FAILED = _r(535, "5.7.8", "Authentication credentials invalid")
AUTH_REAUTHORIZE = _r(535, "5.7.8", "Authentication failed: the mail account must be authorized "
                                    "again by the administrator")
AUTH_TEMP = _r(454, "4.7.0", "Temporary authentication failure, try again later")
ENCRYPTION_REQUIRED = _r(538, "5.7.11", "Encryption required for requested authentication "
                                        "mechanism (use STARTTLS)")
AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")
TOO_MANY_BAD = _r(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = _r(421, "4.4.2", "Timeout waiting for the client, closing connection")
UPSTREAM_LOST = _r(451, "4.4.2", "Connection to the mail provider lost: message not sent, try "
                                 "again later")
SEND_TEMP = _r(451, "4.7.0", "Cannot send through the mail provider right now, try again later")
DATA_GO_AHEAD = _r(354, "", "End data with <CR><LF>.<CR><LF>")
CLIENT_GONE = "client_gone"


class _Close(Exception):
    """End the session now (the answer, if any, was already sent)."""


async def handle_smtp(stream: ClientStream, ctx: GatewayContext) -> None:
    """Serve one SMTP submission client (the server closes ``stream`` afterwards)."""
    await SmtpSession(stream, ctx).run()


@dataclass
class _Transaction:
    """The envelope of the message in progress (counts only: nothing personal is logged)."""

    accepted: int = 0
    refused: int = 0
    size: int = 0
    declared_size: int | None = None


class SmtpSession:
    def __init__(self, stream: ClientStream, ctx: GatewayContext) -> None:
        self.stream = stream
        self.ctx = ctx
        self.config = ctx.config
        self.limits = ctx.config.limits
        self.listener: ListenerConfig = stream.listener
        self.reader = smtp.CommandReader()
        self.state = smtp.SessionState()
        self.bad_commands = 0
        self.account: LocalAccount | None = None  # after AUTH (or the relay user)
        self.authenticated = False
        self.relay_peer = bool(self.listener.relay_from) and in_networks(
            stream.peer_host, self.listener.relay_from)
        self.upstream: UpstreamSMTP | None = None
        self.extensions = Extensions(smtputf8=False, chunking=False)
        self.size_limit = self.limits.smtp_max_message_size
        self.messages = 0
        self.txn = _Transaction()

    @property
    def connector(self) -> SmtpConnector:
        assert self.ctx.smtp is not None
        return self.ctx.smtp

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        hostname = self.config.server.hostname
        if self.ctx.smtp is None:
            await self.send(_r(421, "4.3.0", f"{hostname} sending is not set up, closing"))
            return
        try:
            await self.send(smtp.reply(220, f"{hostname} ESMTP mailgate ready"))
            while (line := await self.next_line()) is not None:
                await self.dispatch(line)
        except _Close:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stream.outcome = CLIENT_GONE
            log.info("smtp %s: client connection lost", self.stream.peer)
        finally:
            await self._close_upstream(polite=True)

    async def _close_upstream(self, *, polite: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        with trio.CancelScope(shield=True):
            if polite and upstream.usable:
                await upstream.quit(self.limits.logout_timeout)
            else:
                await upstream.abort()

    # ------------------------------------------------------------------ I/O

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _try_send(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _receive(self, timeout: float) -> bytes | None:
        """Client bytes; ``None`` after ``timeout`` seconds of silence; ``b""`` at EOF."""
        with trio.move_on_after(timeout):
            return await self.stream.receive_some(RECEIVE_SIZE)
        return None

    async def next_line(self, *, limit: int = smtp.MAX_COMMAND_LINE) -> bytes | None:
        """The next client line; ``None`` when the client is gone or timed out (answered)."""
        self.reader.limit = limit
        timeout = self.limits.smtp_command_timeout if self.authenticated else self.limits.login_timeout
        while True:
            try:
                line = self.reader.next_line()
            except smtp.LineTooLong:
                await self.bad(_r(500, "5.5.2", f"Line too long (limit {limit} octets)"))
                continue
            if line is not None:
                return line
            data = await self._receive(timeout)
            if data is None:
                log.info("smtp %s: timeout waiting for a command, closing", self.stream.peer)
                self.stream.outcome = "timeout"
                await self._try_send(TIMEOUT)
                return None
            if not data:
                return None
            self.reader.feed(data)

    async def bad(self, answer: bytes) -> None:
        """Answer a bad command; close after too many of them."""
        self.bad_commands += 1
        await self.send(answer)
        limit = self.limits.max_bad_commands if self.authenticated else self.limits.max_bad_commands_prelogin
        if self.bad_commands >= limit:
            await self.send(TOO_MANY_BAD)
            raise _Close

    # ------------------------------------------------------------------ dispatch

    async def dispatch(self, line: bytes) -> None:
        if not line.strip():
            await self.bad(_r(500, "5.5.2", "Syntax error, command unrecognized"))
            return
        try:
            command = smtp.parse_command(line, self.state, self.extensions)
        except smtp.CommandRejected as exc:
            await self.bad(exc.wire)
            return
        await self.HANDLERS[command.name](self, command)

    # ------------------------------------------------------------------ greeting, TLS

    def _starttls_offered(self) -> bool:
        return self.listener.tls == "starttls" and not self.stream.tls_active

    async def _ehlo_extensions(self) -> list[str]:
        upstream = await self._provider_extensions()
        size = self.limits.smtp_max_message_size
        declared = upstream.get("SIZE", "") if upstream else ""
        if declared.isdigit() and int(declared) > 0:
            size = min(size, int(declared))
        self.size_limit = size
        offered = set(upstream) if upstream is not None else set()
        self.extensions = Extensions(size=True, eightbitmime="8BITMIME" in offered,
                                     smtputf8="SMTPUTF8" in offered, chunking="CHUNKING" in offered)
        lines = [f"SIZE {size}"]
        lines += ["8BITMIME"] if self.extensions.eightbitmime else []
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        lines += ["SMTPUTF8"] if self.extensions.smtputf8 else []
        lines += ["CHUNKING"] if self.extensions.chunking else []
        lines += ["STARTTLS"] if self._starttls_offered() else []
        if self.stream.plaintext_auth_allowed() and not self.authenticated:
            lines.append("AUTH " + " ".join(MECHANISMS))
        return lines

    async def _provider_extensions(self) -> dict[str, str] | None:
        """What every provider this session may send through offers (their intersection)."""
        providers = self._candidate_providers()
        found: dict[str, str] | None = None
        for provider in providers:
            ext = await self.connector.extensions(provider)
            if ext is None:
                return None
            found = dict(ext) if found is None else {
                k: (v if k != "SIZE" else _min_size(v, found[k])) for k, v in ext.items() if k in found}
        return found

    def _candidate_providers(self) -> list[ProviderConfig]:
        if self.account is not None:
            return [self.account.provider]
        names = {self.listener.relay_user} if self.relay_peer and self.listener.relay_user else set(self.config.users)
        providers = {self.config.users[n].provider for n in names if n in self.config.users}
        return [self.config.providers[p] for p in sorted(providers) if self.config.providers[p].smtp]

    async def cmd_ehlo(self, command: Command) -> None:
        await self._abort_transaction()
        lines = await self._ehlo_extensions()
        self.state.greeted(esmtp=True)
        await self.send(smtp.ehlo_reply(self.config.server.hostname, command.domain or "", lines))

    async def cmd_helo(self, command: Command) -> None:
        await self._abort_transaction()
        await self._ehlo_extensions()
        self.extensions = Extensions(size=False, eightbitmime=False, auth=False)
        self.state.greeted(esmtp=False)
        await self.send(smtp.reply(250, f"{self.config.server.hostname} greets {command.domain}"))

    async def cmd_starttls(self, command: Command) -> None:
        if not self._starttls_offered():
            await self.bad(_r(503, "5.5.1", "TLS is already active" if self.stream.tls_active
                              else "STARTTLS is not offered here"))
            return
        dropped = self.reader.discard_buffered()
        if dropped:
            log.info("smtp %s: discarded %d bytes sent after STARTTLS", self.stream.peer, dropped)
        await self.send(_r(220, "2.0.0", "Ready to start TLS"))
        try:
            await self.stream.start_tls()
        except Exception as exc:  # TLSHandshakeFailed and friends: the client is gone
            log.info("smtp %s: STARTTLS handshake failed: %s", self.stream.peer, exc)
            raise _Close from None
        # RFC 3207 §4.2: everything learnt before TLS is forgotten, an AUTH included.
        self.state.tls_started()
        self.account, self.authenticated = None, False
        self.stream.user = None

    async def cmd_noop(self, command: Command) -> None:
        await self.send(OK)

    async def cmd_help(self, command: Command) -> None:
        await self.send(_r(214, "2.0.0", "See RFC 6409; this is mailgate's submission service"))

    async def cmd_vrfy(self, command: Command) -> None:
        await self.send(_r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    async def cmd_rset(self, command: Command) -> None:
        await self._abort_transaction()
        self.state.reset()
        await self.send(OK)

    async def cmd_quit(self, command: Command) -> None:
        self.stream.outcome = "quit"
        await self.send(_r(221, "2.0.0", "Bye"))
        raise _Close

    # ------------------------------------------------------------------ AUTH

    async def cmd_auth(self, command: Command) -> None:
        if self.authenticated:
            await self.bad(_r(503, "5.5.1", "Already authenticated"))
            return
        if command.mechanism not in MECHANISMS:
            await self.bad(_r(504, "5.5.4", "Unrecognized authentication mechanism"))
            return
        if not self.stream.plaintext_auth_allowed():
            self._publish_failure("-", "plaintext_refused")
            await self.bad(ENCRYPTION_REQUIRED)
            return
        try:
            if command.mechanism == "PLAIN":
                credentials = await self._plain(command.initial_response)
            else:
                credentials = await self._login(command.initial_response)
        except sasl.SASLError as exc:
            await self.bad(_r(501, "5.5.2", f"Cannot decode the response: {exc}"))
            return
        if credentials is None:
            return  # cancelled (answered)
        await self.log_in(*credentials)

    async def _sasl_response(self, challenge: bytes) -> bytes | None:
        """One SASL continuation; ``None`` when the client cancelled with ``*`` (answered)."""
        await self.send(b"334 " + challenge + b"\r\n")
        line = await self.next_line(limit=smtp.MAX_SASL_LINE)
        if line is None:
            raise _Close
        if line.strip() == b"*":
            await self.bad(_r(501, "5.0.0", "Authentication cancelled"))
            return None
        return line

    async def _plain(self, initial: bytes | None) -> tuple[str, str] | None:
        response = initial if initial is not None else await self._sasl_response(b"")
        if response is None:
            return None
        creds = sasl.decode_plain(response)
        if creds.authzid and creds.authzid != creds.authcid:
            raise sasl.SASLError("proxy authorization is not supported")
        return creds.authcid, creds.password

    async def _login(self, initial: bytes | None) -> tuple[str, str] | None:
        user_b64 = initial if initial is not None else await self._sasl_response(sasl.LOGIN_USERNAME_CHALLENGE)
        if user_b64 is None:
            return None
        user = sasl.decode_login_step(user_b64)
        password_b64 = await self._sasl_response(sasl.LOGIN_PASSWORD_CHALLENGE)
        if password_b64 is None:
            return None
        return user, sasl.decode_login_step(password_b64)

    async def log_in(self, username: str, password: str) -> None:
        try:
            account = await self.ctx.accounts.login(username, password, peer=self.stream.peer_host)
        except AuthenticationFailed:
            self._publish_failure(username, "bad_credentials")
            log.info("smtp %s: login failed for %r", self.stream.peer, username)
            await self.bad(AUTH_FAILED)
            return
        except ReauthorizationRequired as exc:
            self._publish_failure(username, "reauthorization_required")
            log.warning("smtp %s: %s", self.stream.peer, exc)
            await self.bad(AUTH_REAUTHORIZE)
            return
        except TemporaryFailure as exc:
            self._publish_failure(username, "temporary")
            log.warning("smtp %s: login of %r failed for now: %s", self.stream.peer, username, exc)
            await self.send(AUTH_TEMP)
            return
        self.account = account
        self.authenticated = True
        self.bad_commands = 0
        self.stream.user = account.name
        self.ctx.events.publish({"type": "session.authenticated", "protocol": "smtp",
                                 "peer": self.stream.peer, "user": account.name})
        log.info("smtp %s: %s authenticated", self.stream.peer, account.name)
        await self.send(AUTH_OK)

    def _publish_failure(self, user: str, reason: str) -> None:
        self.ctx.events.publish({"type": "login.failed", "protocol": "smtp", "peer": self.stream.peer,
                                 "user": user, "reason": reason})

    # ------------------------------------------------------------------ the transaction

    def _sender_account(self) -> LocalAccount | None:
        """Who this session sends as: the AUTH user, or the relay user for a relay peer."""
        if self.account is not None:
            return self.account
        if self.relay_peer and self.listener.relay_user is not None:
            try:
                account = self.ctx.accounts.account(self.listener.relay_user)
            except KeyError:
                return None
            self.account = account
            self.stream.user = account.name
            return account
        return None

    async def cmd_mail(self, command: Command) -> None:
        account = self._sender_account()
        if account is None:
            self.ctx.events.publish({"type": "smtp.refused", "peer": self.stream.peer, "reason": "auth_required"})
            log.info("smtp %s: unauthenticated MAIL refused (not a relay network)", self.stream.peer)
            await self.bad(AUTH_REQUIRED)
            return
        assert command.path is not None
        allowed = [account.upstream_user, *account.user.send_as]
        if command.path.casefold() not in {a.casefold() for a in allowed}:
            log.warning("smtp %s: %s tried to send as another address (refused)", self.stream.peer, account.name)
            self.ctx.events.publish({"type": "smtp.refused", "peer": self.stream.peer, "user": account.name,
                                     "reason": "sender_not_owned"})
            await self.bad(_r(553, "5.7.1", f"Sender address rejected: not owned by {account.name} "
                                            "(send as the account's address or a send_as alias)"))
            return
        declared = command.param("SIZE")
        if declared is not None and int(declared) > self.size_limit:
            await self.send(_r(552, "5.3.4", f"Message size exceeds fixed maximum message size ({self.size_limit})"))
            return
        if self.messages >= self.limits.smtp_messages_per_session:
            await self.send(_r(421, "4.7.0", "Too many messages in this session, reconnect to send more"))
            raise _Close
        if not self.connector.try_send(account.name):
            log.warning("smtp %s: %s reached limits.smtp_messages_per_user_per_hour (%d)",
                        self.stream.peer, account.name, self.limits.smtp_messages_per_user_per_hour)
            await self.send(_r(451, "4.7.1", "Hourly sending limit reached for this account, try again later"))
            return
        upstream = await self._upstream(account)
        if upstream is None:
            return
        self.txn = _Transaction(declared_size=int(declared) if declared is not None else None)
        line = f"MAIL FROM:<{command.path}>" + (f" {command.raw_params}" if command.raw_params else "")
        reply = await self._relay_command(line)
        if reply is not None and reply.positive:
            self.state.mail_accepted()

    async def cmd_rcpt(self, command: Command) -> None:
        if self.txn.accepted >= self.limits.smtp_max_recipients:
            await self.send(_r(452, "4.5.3", f"Too many recipients (limit {self.limits.smtp_max_recipients})"))
            return
        reply = await self._relay_command(f"RCPT TO:<{command.path}>")
        if reply is None:
            return
        if reply.positive:
            self.txn.accepted += 1
            self.state.rcpt_accepted()
        else:
            self.txn.refused += 1

    async def _upstream(self, account: LocalAccount) -> UpstreamSMTP | None:
        """The session's upstream connection, opened on first use; ``None`` if it could not be
        (the client was answered)."""
        if self.upstream is not None and self.upstream.usable:
            return self.upstream
        await self._close_upstream(polite=False)
        try:
            self.upstream = await self.connector.open(account)
        except ReauthorizationRequired as exc:
            self._problem(account.name, str(exc), "reauthorization_required", exc.hint + " (re-authorize to send)")
            await self.send(_r(554, "5.7.0", "Cannot send: the mail account must be authorized again "
                                             "by the administrator"))
            return None
        except SmtpRefused as exc:
            key = exc.explanation.key if exc.explanation else "refused"
            self._problem(account.name, str(exc.reply), key, exc.explanation.advice if exc.explanation else "")
            await self.send(_r(554, "5.7.0", f"Cannot send: the mail provider refused the login "
                                             f"({exc.reply.code} {exc.reply.enhanced or ''})".replace(" )", ")")))
            return None
        except AuthenticationFailed as exc:  # the relay user's credentials are sealed
            log.warning("smtp %s: cannot send as %s: %s", self.stream.peer, account.name, exc)
            await self.send(_r(451, "4.7.0", "Cannot send as the relay account yet: its user must log "
                                             "in once, or its provider needs a key_file"))
            return None
        except SmtpTemporary as exc:
            if exc.reply is not None and exc.explanation is not None:
                self._problem(account.name, str(exc.reply), exc.explanation.key, exc.explanation.advice)
            log.warning("smtp %s: cannot send as %s for now: %s", self.stream.peer, account.name, exc)
            await self.send(SEND_TEMP)
            return None
        except TemporaryFailure as exc:
            log.warning("smtp %s: cannot send as %s for now: %s", self.stream.peer, account.name, exc)
            await self.send(_r(451, "4.4.1", "Cannot reach the mail provider right now, try again later"))
            return None
        return self.upstream

    def _problem(self, account: str, reply: str, key: str, advice: str) -> None:
        log.warning("smtp: account %s: provider answer %s (%s)%s", account, reply, key,
                    f" -- {advice}" if advice else "")
        self.connector.note_problem(account, reply, key, advice)

    async def _relay_command(self, line: str) -> Reply | None:
        """Send one transaction command upstream and the reply to the client; ``None`` when the
        upstream failed (the client got ``451``, the transaction is over)."""
        if self.upstream is None:
            await self._lost_upstream()
            return None
        try:
            reply = await self.upstream.command(line)
        except MailgateError as exc:
            log.warning("smtp %s: upstream failed: %s", self.stream.peer, exc)
            await self._lost_upstream()
            return None
        self._count_reply(reply)
        if reply.code == 421:
            await self._relay_reply(reply)
            return None
        await self.send(reply.wire())
        return reply

    async def _relay_reply(self, reply: Reply) -> None:
        """An upstream reply to the client. ``421`` (the upstream is closing) ends the
        transaction, not the client's session: the client gets ``451`` with the upstream's
        text, and the upstream connection is dropped (the next MAIL opens a new one)."""
        if reply.code != 421:
            await self.send(reply.wire())
            return
        await self._close_upstream(polite=False)
        self.state.transaction_done()
        await self.send(_r(451, reply.enhanced or "4.3.0", f"The mail provider closed the connection: {reply.text}"))

    async def _lost_upstream(self) -> None:
        await self._close_upstream(polite=False)
        self.state.transaction_done()
        await self.send(UPSTREAM_LOST)

    def _count_reply(self, reply: Reply) -> None:
        explained = explain(reply)
        if explained is not None and self.account is not None:
            self._problem(self.account.name, str(reply), explained.key, explained.advice)

    async def _abort_transaction(self) -> None:
        """RSET/EHLO during a transaction: reset the upstream side too."""
        if self.state.state in (State.MAIL, State.RCPT, State.CHUNKING) and self.upstream is not None:
            if not await self.upstream.reset():
                await self._close_upstream(polite=False)
        self.txn = _Transaction()

    # ------------------------------------------------------------------ DATA

    async def cmd_data(self, command: Command) -> None:
        reply = await self._upstream_data_start()
        if reply is None:
            return
        scanner = smtp.DataScanner(self.size_limit)
        upstream_failed: str | None = None
        chunk = self.reader.take(self.reader.buffered)
        while True:
            step = scanner.feed(chunk)
            if step.forward and upstream_failed is None:
                upstream_failed = await self._forward(step.forward)
            if step.done:
                self.reader.feed(step.rest)
                break
            chunk = await self._data_bytes()
        self.txn.size = scanner.size
        await self._finish(scanner.refusal, upstream_failed)

    async def _upstream_data_start(self) -> Reply | None:
        if self.upstream is None:
            await self._lost_upstream()
            return None
        try:
            reply = await self.upstream.command("DATA")
        except MailgateError as exc:
            log.warning("smtp %s: upstream failed at DATA: %s", self.stream.peer, exc)
            await self._lost_upstream()
            return None
        self._count_reply(reply)
        if reply.code != 354:
            await self._relay_reply(reply)
            return None
        await self.send(DATA_GO_AHEAD)
        return reply

    async def _data_bytes(self) -> bytes:
        """More message data from the client; the client going away or stalling ends the
        session, and the upstream connection is closed without the end of data."""
        data = await self._receive(self.limits.smtp_data_timeout)
        if data:
            return data
        self.stream.outcome = "timeout" if data is None else CLIENT_GONE
        log.info("smtp %s: client %s during the message data: nothing was sent", self.stream.peer,
                 "stalled" if data is None else "went away")
        await self._close_upstream(polite=False)
        self._message_done("aborted", None)
        if data is None:
            await self._try_send(TIMEOUT)
        raise _Close

    async def _forward(self, data: bytes) -> str | None:
        assert self.upstream is not None
        try:
            await self.upstream.send_data(data)
        except MailgateError as exc:
            return str(exc)
        return None

    async def _finish(self, refusal: str | None, upstream_failed: str | None) -> None:
        """The end of one message's data: answer the client with the upstream's verdict."""
        self.state.transaction_done()
        if refusal is not None:
            await self._close_upstream(polite=False)  # the upstream never sees the end of data
            self._message_done("refused_" + refusal, None)
            if refusal == "size":
                await self.send(_r(552, "5.3.4", f"Message size exceeds fixed maximum message size ({self.size_limit})"))
            else:
                await self.send(_r(550, "5.6.11", "Message refused: a line holding a lone dot ends or "
                                                  "starts with a bare LF (write CRLF line ends)"))
            return
        if upstream_failed is not None:
            log.warning("smtp %s: upstream failed during the message data: %s", self.stream.peer, upstream_failed)
            await self._close_upstream(polite=False)
            self._message_done("upstream_failed", None)
            await self.send(UPSTREAM_LOST)
            return
        assert self.upstream is not None
        try:
            reply = await self.upstream.data_reply()
        except MailgateError as exc:
            log.warning("smtp %s: no answer from the upstream to the message: %s", self.stream.peer, exc)
            await self._close_upstream(polite=False)
            self._message_done("upstream_failed", None)
            await self.send(UPSTREAM_LOST)
            return
        self._count_reply(reply)
        self._message_done("sent" if reply.positive else "refused_upstream", reply)
        await self._relay_reply(reply)

    # ------------------------------------------------------------------ BDAT (RFC 3030)

    async def cmd_bdat(self, command: Command) -> None:
        assert command.size is not None
        if self.upstream is None:  # lost after RCPT: the transaction is over
            await self._lost_upstream()
            return
        self.txn.size += command.size
        too_big = self.txn.size > self.size_limit
        failed: str | None = None
        if not too_big:
            line = f"BDAT {command.size}" + (" LAST" if command.last else "")
            failed = await self._forward(line.encode() + b"\r\n")
        remaining = command.size
        while remaining:
            chunk = self.reader.take(remaining)
            if not chunk:
                chunk = await self._data_bytes()
                self.reader.feed(chunk)
                continue
            remaining -= len(chunk)
            if not too_big and failed is None:
                failed = await self._forward(chunk)
        if too_big or failed is not None:
            await self._finish("size" if too_big else None, failed)
            return
        assert self.upstream is not None
        try:
            reply = await self.upstream.data_reply() if command.last else await self.upstream.read_reply()
        except MailgateError as exc:
            await self._finish(None, str(exc))
            return
        self._count_reply(reply)
        if command.last or not reply.positive:
            self.state.transaction_done()
            self._message_done("sent" if reply.positive else "refused_upstream", reply)
        else:
            self.state.chunk_accepted(last=False)
        await self._relay_reply(reply)

    # ------------------------------------------------------------------ accounting

    def _message_done(self, outcome: str, reply: Reply | None) -> None:
        user = self.account.name if self.account is not None else "-"
        code = f"{reply.code} {reply.enhanced or ''}".strip() if reply is not None else "-"
        txn = self.txn
        if outcome == "sent":
            self.messages += 1
        fields = {"user": user, "peer": self.stream.peer, "rcpts": txn.accepted,
                  "rcpts_refused": txn.refused, "size": txn.size, "reply": code,
                  "reply_class": f"{reply.code // 100}xx" if reply is not None else "none",
                  "outcome": outcome, "relay": not self.authenticated}
        log.info("smtp message: user=%s peer=%s rcpts=%d rcpts_refused=%d size=%d upstream_reply=%s "
                 "outcome=%s", user, self.stream.peer, txn.accepted, txn.refused, txn.size, code, outcome,
                 extra={"fields": fields})
        self.ctx.events.publish({"type": "smtp.message", **fields})
        self.txn = _Transaction()

    # ------------------------------------------------------------------ the command table

    #: Every command :func:`~gateway.protocol.smtp.parse_command` lets through, with the section
    #: of the RFC that defines it; which state allows which is the parser's table
    #: (:data:`gateway.protocol.smtp.ALLOWED`).
    HANDLERS: ClassVar[dict[str, Handler]] = {
        "EHLO": cmd_ehlo,  # RFC 5321 §4.1.1.1
        "HELO": cmd_helo,  # RFC 5321 §4.1.1.1
        "STARTTLS": cmd_starttls,  # RFC 3207 §4
        "AUTH": cmd_auth,  # RFC 4954 §4
        "MAIL": cmd_mail,  # RFC 5321 §4.1.1.2 (SIZE: RFC 1870; BODY: RFC 6152; SMTPUTF8: RFC 6531)
        "RCPT": cmd_rcpt,  # RFC 5321 §4.1.1.3
        "DATA": cmd_data,  # RFC 5321 §4.1.1.4
        "BDAT": cmd_bdat,  # RFC 3030 §2
        "RSET": cmd_rset,  # RFC 5321 §4.1.1.5
        "VRFY": cmd_vrfy,  # RFC 5321 §4.1.1.6 (answered 252: never verified)
        "HELP": cmd_help,  # RFC 5321 §4.1.1.8
        "NOOP": cmd_noop,  # RFC 5321 §4.1.1.9
        "QUIT": cmd_quit,  # RFC 5321 §4.1.1.10
    }


def _min_size(a: str, b: str) -> str:
    """The smaller of two SIZE parameters (``""`` or ``0``: no limit)."""
    sizes = [int(v) for v in (a, b) if v.isdigit() and int(v) > 0]
    return str(min(sizes)) if sizes else ""
