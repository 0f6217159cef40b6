"""The POP3 front end: one client connection, from greeting to QUIT.

Theory of operation
===================

:func:`handle_pop3` is the thin I/O driver around the sans-IO core
(:mod:`gateway.protocol.pop3`) and the IMAP translation
(:mod:`gateway.frontends.pop3_mapping`). It reads client bytes into a
:class:`~gateway.protocol.pop3.LineReader`, parses each line against the session's
RFC 1939 state and answers through ``Pop3Session.HANDLERS``, the table of one handler
per command (with the RFC section that defines it); the server closes the connection
when it returns.

AUTHORIZATION
    CAPA, USER/PASS, AUTH PLAIN (initial response or a ``+`` continuation, ``*``
    cancels), STLS (only without TLS; everything the client sent after the STLS line is
    discarded before the handshake, RFC 2595 §3.1), QUIT. Passwords are only accepted
    over TLS or from the listener's ``plaintext_auth_from`` networks (``-ERR [AUTH]``
    otherwise, pointing to STLS only where it is offered, and CAPA then lists neither
    USER nor SASL). QUIT ends the session without entering UPDATE. A login checks the
    local password (``AccountManager.login``), takes the account's exclusive maildrop
    lock (the credential store's ``maildrop_lock``, across processes and instances;
    ``-ERR [IN-USE]`` if another POP3 session holds it), logs in upstream and takes
    the snapshot. Each wait for a line is bounded by ``limits.login_timeout``; after
    ``limits.max_bad_commands_prelogin`` bad commands or failed logins the connection
    is closed.

TRANSACTION
    STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, CAPA, QUIT. RETR and TOP stream
    the message through a :class:`BatchedWriter` that sends in writes of at least
    :data:`WRITE_BATCH` bytes (TLS throughput) and never holds more than about that.
    Each wait for a command is bounded by ``limits.pop3_idle_timeout``; on expiry the
    connection is closed without an answer and nothing is deleted (RFC 1939 §3). After
    ``limits.max_bad_commands`` bad commands the connection is closed.

UPDATE
    Only QUIT in TRANSACTION applies the deletions (``Maildrop.commit``). Every other
    end (EOF, timeout, upstream failure, too many bad commands) just closes.

Errors map to RFC 2449/3206 codes: authentication → ``[AUTH]``, IdP or upstream
unreachable → ``[SYS/TEMP]`` (and the session ends if the upstream connection is
broken), a message gone upstream → plain ``-ERR`` for that message. If the upstream dies
in the middle of a RETR the client sees the connection end without the final ".".
Nothing secret (passwords, tokens, SASL data, message bodies) is ever logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ..errors import (
    AuthenticationFailed,
    MailgateError,
    ReauthorizationRequired,
    TemporaryFailure,
    UpstreamError,
)
from ..oauth.store import StoreError
from ..protocol import pop3, sasl
from ..protocol.pop3 import Code, Command, State
from ..upstream.client import CommandFailed, UpstreamIMAP
from .pop3_listing import Listings, Pop3StateFiles
from .pop3_mapping import STATE_SUBDIR, CommitRefused, Maildrop, MessageUnavailable, SizeCache

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..net import ClientStream
    from ..ports import HeldLock, LocalAccount

log = logging.getLogger("mailgate.pop3")

#: Outgoing message data is sent in writes of at least this many bytes.
WRITE_BATCH = 64 * 1024
#: Read size for client input.
RECEIVE_SIZE = 65536
#: The SASL mechanisms offered (APOP and CRAM need the plaintext password: not stored).
SASL_MECHANISMS = ("PLAIN",)
IMPLEMENTATION = "mailgate"

GREETING = pop3.ok("mailgate POP3 ready.")
AUTH_FAILED = pop3.err("Authentication failed.", Code.AUTH)
REAUTHORIZE = pop3.err(
    "Authentication failed: the mail account must be authorized again by the administrator.",
    Code.AUTH,
)
TEMP_FAILURE = pop3.err("Temporary failure, try again later.", Code.SYS_TEMP)
IN_USE = pop3.err("Mailbox is locked by another POP3 session.", Code.IN_USE)
MAILBOX_UNAVAILABLE = pop3.err("The mailbox cannot be opened upstream.", Code.SYS_PERM)
PLAINTEXT_REFUSED = pop3.err(
    "Plaintext authentication disallowed on non-secure connections: use STLS.", Code.AUTH
)
#: The same refusal on a listener without TLS (``tls = "none"``), which offers no STLS.
PLAINTEXT_REFUSED_NO_TLS = pop3.err(
    "Plaintext authentication disallowed on non-secure connections: this port offers no TLS.",
    Code.AUTH,
)


#: A command handler of :class:`Pop3Session` (see ``Pop3Session.HANDLERS``).
Handler = Callable[["Pop3Session", Command], Awaitable[None]]


async def handle_pop3(stream: "ClientStream", ctx: "GatewayContext") -> None:
    """Serve one POP3 client (the server closes ``stream`` afterwards)."""
    await Pop3Session(stream, ctx).run()


class _Close(Exception):
    """End the session now (the answer, if any, was already sent)."""


class BatchedWriter:
    """Collects outgoing bytes and sends them in writes of at least ``batch`` bytes."""

    def __init__(self, stream: "ClientStream", batch: int = WRITE_BATCH) -> None:
        self._stream = stream
        self._batch = batch
        self._buffer = bytearray()
        self.sent = 0  # bytes actually handed to the client connection

    def discard(self) -> None:
        """Drop what is buffered (an answer that failed before any of it was sent)."""
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        if not self._buffer and len(data) >= self._batch:  # a whole batch: no copy
            await self._stream.send_all(data)
            self.sent += len(data)
            return
        self._buffer += data
        if len(self._buffer) >= self._batch:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()  # handed over, not copied
            await self._stream.send_all(data)
            self.sent += len(data)


class Pop3Session:
    def __init__(self, stream: "ClientStream", ctx: "GatewayContext") -> None:
        self.stream = stream
        self.ctx = ctx
        self.limits = ctx.config.limits
        self.reader = pop3.LineReader()
        self.state = pop3.SessionState()
        self.writer = BatchedWriter(stream)
        self.bad_commands = 0
        self.account: LocalAccount | None = None
        self.upstream: UpstreamIMAP | None = None
        self.maildrop: Maildrop | None = None
        self.lock: HeldLock | None = None  # the store's maildrop lock, across instances

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self.send(GREETING)
            while not self.state.finished:
                line = await self.next_line()
                if line is None:
                    return
                await self.dispatch(line)
        except _Close:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("pop3 %s: client connection lost", self.stream.peer)
        finally:
            await self._release()

    async def _release(self) -> None:
        with trio.CancelScope(shield=True):
            if self.maildrop is not None and self.upstream is not None:
                # RETRs of a session that ended without QUIT still count as downloads.
                with trio.move_on_after(self.limits.logout_timeout):
                    try:
                        await self.maildrop.flush_seen()
                    except MailgateError as exc:
                        log.info("pop3 %s: could not mark retrieved messages seen: %s",
                                 self.stream.peer, exc)
            # The maildrop is done with: unlock first, so a client polling again at once is
            # not refused while the connection is given back.
            if self.lock is not None:  # a store call (PostgreSQL: a round trip), bounded
                lock, self.lock = self.lock, None
                with trio.move_on_after(self.limits.logout_timeout):
                    await trio.to_thread.run_sync(lock.release, abandon_on_cancel=True)
            if self.upstream is not None:
                # Back to the account's pool (mailbox left with UNSELECT) or logged out: a
                # connection interrupted mid-command is unusable and never pooled.
                upstream, self.upstream = self.upstream, None
                await self.ctx.connector.release(upstream, clean=True)

    # ------------------------------------------------------------------ I/O

    async def send(self, data: bytes) -> None:
        await self.writer.write(data)
        await self.writer.flush()

    def _timeout(self) -> float:
        if self.state.state is State.TRANSACTION:
            return self.limits.pop3_idle_timeout
        return self.limits.login_timeout

    async def next_line(self, *, limit: int = pop3.MAX_COMMAND_LINE) -> bytes | None:
        """The next client line; ``None`` at EOF or idle timeout (close silently)."""
        self.reader.limit = limit
        with trio.move_on_after(self._timeout()):
            while True:
                try:
                    line = self.reader.next_line()
                except pop3.LineTooLong:
                    await self.bad(pop3.err(f"Line too long (limit {limit} octets)."))
                    continue
                if line is not None:
                    return line
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return None
                self.reader.feed(data)
        log.info("pop3 %s: idle timeout, closing (nothing deleted)", self.stream.peer)
        return None

    async def bad(self, answer: bytes) -> None:
        """Answer a bad command and close after too many of them."""
        self.bad_commands += 1
        await self.send(answer)
        limit = (
            self.limits.max_bad_commands
            if self.state.state is State.TRANSACTION
            else self.limits.max_bad_commands_prelogin
        )
        if self.bad_commands >= limit:
            await self.send(pop3.err("Too many bad commands, closing."))
            raise _Close

    # ------------------------------------------------------------------ dispatch

    async def dispatch(self, line: bytes) -> None:
        try:
            command = pop3.parse_command(line, self.state)
        except pop3.CommandRejected as exc:
            await self.bad(pop3.err(f"{exc}."))
            return
        handler = self.HANDLERS[command.name]
        try:
            await handler(self, command)
        except MessageUnavailable as exc:
            await self.send(pop3.err(f"{exc}."))
        except UpstreamError as exc:
            log.warning("pop3 %s: upstream failed during %s: %s", self.stream.peer, command.name, exc)
            await self._try_send(TEMP_FAILURE)
            raise _Close from None
        except TemporaryFailure as exc:
            log.warning("pop3 %s: %s failed for now: %s", self.stream.peer, command.name, exc)
            await self._try_send(TEMP_FAILURE)
            raise _Close from None

    async def _try_send(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ------------------------------------------------------------------ AUTHORIZATION

    async def cmd_capa(self, command: Command) -> None:
        lines = pop3.capability_lines(
            state=self.state.state,
            stls_available=self._stls_available(),
            user_login_allowed=self.stream.plaintext_auth_allowed(),
            sasl_mechanisms=SASL_MECHANISMS,
            implementation=IMPLEMENTATION,
        )
        await self.send(pop3.multiline(pop3.ok("Capability list follows"), lines))

    def _stls_available(self) -> bool:
        return not self.stream.tls_active and self.stream.listener.tls == "starttls"

    async def cmd_stls(self, command: Command) -> None:
        if not self._stls_available():
            await self.bad(pop3.err("TLS is already active." if self.stream.tls_active else "STLS is not offered here."))
            return
        dropped = self.reader.discard_buffered()
        if dropped:
            log.info("pop3 %s: discarded %d bytes sent after STLS", self.stream.peer, dropped)
        self.state.forget_user()
        await self.send(pop3.ok("Begin TLS negotiation now."))
        try:
            await self.stream.start_tls()
        except Exception as exc:  # TLSHandshakeFailed and friends: the client is gone
            log.info("pop3 %s: STLS handshake failed: %s", self.stream.peer, exc)
            raise _Close from None

    async def cmd_user(self, command: Command) -> None:
        if not self.stream.plaintext_auth_allowed():
            await self._refuse_plaintext()
            return
        assert command.arg is not None
        self.state.user_accepted(command.arg)
        await self.send(pop3.ok())

    async def cmd_pass(self, command: Command) -> None:
        if not self.stream.plaintext_auth_allowed():
            await self._refuse_plaintext()
            return
        user = self.state.pending_user
        self.state.forget_user()
        assert user is not None and command.arg is not None
        await self.log_in(user, command.arg)

    async def cmd_auth(self, command: Command) -> None:
        if command.mechanism is None:
            await self.send(pop3.multiline(pop3.ok(), [m.encode() for m in SASL_MECHANISMS]))
            return
        if command.mechanism not in SASL_MECHANISMS:
            await self.bad(pop3.err("Unsupported authentication mechanism."))
            return
        if not self.stream.plaintext_auth_allowed():
            await self._refuse_plaintext()
            return
        response = command.initial_response
        if response is None:
            await self.send(pop3.continuation())
            response = await self.next_line(limit=pop3.MAX_SASL_LINE)
            if response is None:
                raise _Close
            if response.strip() == b"*":
                await self.bad(pop3.err("Authentication cancelled."))
                return
        try:
            creds = sasl.decode_plain(response)
        except sasl.SASLError as exc:
            await self.bad(pop3.err(f"{exc}.", Code.AUTH))
            return
        if creds.authzid and creds.authzid != creds.authcid:
            await self.bad(AUTH_FAILED)  # no proxy authorization
            return
        await self.log_in(creds.authcid, creds.password)

    async def _refuse_plaintext(self) -> None:
        self._publish_failure("-", "plaintext_refused")
        await self.bad(PLAINTEXT_REFUSED if self._stls_available() else PLAINTEXT_REFUSED_NO_TLS)

    async def cmd_quit(self, command: Command) -> None:
        if not self.state.quit():
            await self.send(pop3.ok("Logging out."))
            return
        assert self.maildrop is not None and self.account is not None
        try:
            text = await self.maildrop.commit()
        except CommitRefused as exc:
            log.warning("pop3 %s: %s: %s", self.stream.peer, self.account.name, exc)
            await self.send(pop3.err(f"{exc}.", Code.SYS_PERM))
            return
        except MailgateError as exc:
            log.warning("pop3 %s: %s: deleting failed: %s", self.stream.peer, self.account.name, exc)
            await self.send(pop3.err("Some deleted messages were not removed.", Code.SYS_TEMP))
            return
        # The upstream back to the pool and the maildrop unlocked *before* the +OK: a client
        # that polls again at once must find both free.
        await self._release()
        await self.send(pop3.ok(f"{text}."))

    # ------------------------------------------------------------------ the login

    async def log_in(self, username: str, password: str) -> None:
        account = None
        try:
            account = await self.ctx.accounts.login(username, password, peer=self.stream.peer_host)
            try:
                self.lock = await trio.to_thread.run_sync(self.ctx.store.maildrop_lock,
                                                          account.name)
            except StoreError as exc:
                raise TemporaryFailure(f"maildrop lock: {exc}") from None
            if self.lock is None:
                log.info("pop3 %s: %s already has a POP3 session", self.stream.peer, account.name)
                self._publish_failure(account.name, "in_use")
                await self.send(IN_USE)
                return
            self.upstream = await self.ctx.connector.open(account)
            user = account.user
            state = self.ctx.pop3_state or Pop3StateFiles(
                self.ctx.config.server.state_dir / STATE_SUBDIR)
            self.maildrop = await Maildrop.open(
                self.upstream,
                mailbox=user.pop3_mailbox,
                delete_mode=user.pop3_delete,
                size_cache=SizeCache(state, account.name),
                listings=Listings(state),
                account=account.name,
            )
        except AuthenticationFailed:
            await self._release()
            self._publish_failure(username, "bad_credentials")
            log.info("pop3 %s: login failed for %r", self.stream.peer, username)
            await self.bad(AUTH_FAILED)
            return
        except ReauthorizationRequired as exc:
            await self._release()
            self._publish_failure(username, "reauthorization_required")
            log.warning("pop3 %s: %s", self.stream.peer, exc)
            await self.bad(REAUTHORIZE)
            return
        except CommandFailed as exc:  # e.g. SELECT of a mailbox that does not exist
            await self._release()
            assert account is not None
            if exc.backoff is not None:  # Microsoft 365 throttling: temporary, not the mailbox
                log.warning("pop3 %s: %s: upstream is throttling (%s); the client is told to "
                            "retry later", self.stream.peer, account.name, exc)
                await self.send(TEMP_FAILURE)
                return
            log.warning("pop3 %s: cannot open %r of %s: %s", self.stream.peer,
                        account.user.pop3_mailbox, account.name, exc)
            await self.send(MAILBOX_UNAVAILABLE)
            return
        except TemporaryFailure as exc:
            await self._release()
            self._publish_failure(username, "temporary")
            who = account.name if account is not None else username
            log.warning("pop3 %s: login of %r failed for now: %s", self.stream.peer, who, exc)
            await self.send(TEMP_FAILURE)
            return
        except BaseException:
            await self._release()
            raise
        self.account = account
        self.state.logged_in()
        self.bad_commands = 0
        self.stream.user = account.name
        count, octets = self.maildrop.stat()
        self.ctx.events.publish(
            {"type": "session.authenticated", "protocol": "pop3", "peer": self.stream.peer,
             "user": account.name}
        )
        log.info("pop3 %s: %s logged in, %d messages", self.stream.peer, account.name, count)
        await self.send(pop3.ok(f"Logged in, {count} messages ({octets} octets)."))

    def _publish_failure(self, user: str, reason: str) -> None:
        self.ctx.events.publish(
            {"type": "login.failed", "protocol": "pop3", "peer": self.stream.peer, "user": user,
             "reason": reason}
        )

    # ------------------------------------------------------------------ TRANSACTION

    @property
    def drop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    async def cmd_stat(self, command: Command) -> None:
        count, octets = self.drop.stat()
        await self.send(pop3.ok(f"{count} {octets}"))

    async def cmd_list(self, command: Command) -> None:
        if command.msg is not None:
            message = self.drop.get(command.msg)
            await self.send(pop3.ok(f"{message.number} {message.size}"))
            return
        count, octets = self.drop.stat()
        lines = (pop3.scan_listing(m.number, m.size) for m in self.drop.visible())
        await self.send(pop3.multiline(pop3.ok(f"{count} messages ({octets} octets)"), lines))

    async def cmd_uidl(self, command: Command) -> None:
        if command.msg is not None:
            message = self.drop.get(command.msg)
            await self.send(pop3.ok(f"{message.number} {message.uidl}"))
            return
        lines = (pop3.scan_listing(m.number, m.uidl) for m in self.drop.visible())
        await self.send(pop3.multiline(pop3.ok(), lines))

    async def cmd_retr(self, command: Command) -> None:
        assert command.msg is not None
        await self._send_message(command.msg, None)

    async def cmd_top(self, command: Command) -> None:
        assert command.msg is not None
        await self._send_message(command.msg, command.lines)

    async def _send_message(self, number: int, top_lines: int | None) -> None:
        sent_before = self.writer.sent
        try:
            await self.drop.send(number, self.writer.write, top_lines=top_lines)
        except UpstreamError as exc:
            log.warning("pop3 %s: upstream failed while sending message %d: %s",
                        self.stream.peer, number, exc)
            if self.writer.sent == sent_before:  # nothing of the answer went out: say why
                self.writer.discard()
                await self._try_send(TEMP_FAILURE)
            # Otherwise the answer is half sent: end the connection without the final ".".
            raise _Close from None
        await self.writer.flush()

    async def cmd_dele(self, command: Command) -> None:
        assert command.msg is not None
        self.drop.delete(command.msg)
        await self.send(pop3.ok("Marked to be deleted."))

    async def cmd_rset(self, command: Command) -> None:
        self.drop.reset()
        count, octets = self.drop.stat()
        await self.send(pop3.ok(f"{count} messages ({octets} octets)."))

    async def cmd_noop(self, command: Command) -> None:
        await self.send(pop3.ok())

    # ------------------------------------------------------------------ the command table

    #: Every command :func:`~gateway.protocol.pop3.parse_command` accepts, with the section
    #: of the RFC that defines it. Which state allows which command is the parser's table
    #: (:data:`gateway.protocol.pop3.ALLOWED`); APOP never gets here (the parser refuses it).
    HANDLERS: ClassVar[dict[str, Handler]] = {
        # AUTHORIZATION
        "USER": cmd_user,  # RFC 1939 §7
        "PASS": cmd_pass,  # RFC 1939 §7
        "AUTH": cmd_auth,  # RFC 5034 §4 (without a mechanism: the list, as RFC 1734)
        "STLS": cmd_stls,  # RFC 2595 §4
        # TRANSACTION
        "STAT": cmd_stat,  # RFC 1939 §5
        "LIST": cmd_list,  # RFC 1939 §5
        "RETR": cmd_retr,  # RFC 1939 §5
        "DELE": cmd_dele,  # RFC 1939 §5
        "NOOP": cmd_noop,  # RFC 1939 §5
        "RSET": cmd_rset,  # RFC 1939 §5
        "TOP": cmd_top,  # RFC 1939 §7
        "UIDL": cmd_uidl,  # RFC 1939 §7
        # both
        "CAPA": cmd_capa,  # RFC 2449 §5
        "QUIT": cmd_quit,  # RFC 1939 §4 (AUTHORIZATION), §6 (UPDATE)
    }

