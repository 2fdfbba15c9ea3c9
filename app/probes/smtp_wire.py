"""SMTP on the wire for probing hostile servers: aiosmtplib's protocol, plus what a prober needs on top of it.

aiosmtplib's `SMTPProtocol` does the reading and writing: a reply line is at most 8 KiB and a whole reply 32 KiB,
commands carrying a control character (CR, LF, NUL...) are refused before they are sent, every read has a
timeout, STARTTLS discards what the server sent before the handshake. We use the protocol layer rather than
`aiosmtplib.SMTP`, whose `mail()` and `rcpt()` re-quote addresses (undoing the deliberately odd forms of the relay
table) and whose errors lose the reply's step. This layer adds only:
- the transcript: every line in and out, exactly as it passed, written as it passes (evidence, and what a
  hostile server sent before the connection broke);
- a reply code check (2xx-5xx), enhanced status codes (RFC 3463), and a length cap on our own commands;
- our errors (`Dropped`, `Timeout`, `ProtocolError`, `TlsFailed`), which the probe maps to verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from aiosmtplib import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected, SMTPStatus, SMTPTimeoutError
from aiosmtplib.protocol import (
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)

from app.probes.tls import certificate_subject, tls_context
from app.probes.transcript import Transcript

MAX_LINE = MAX_LINE_LENGTH  # bytes in one reply line (aiosmtplib's bound; RFC 5321 allows 512)
MAX_REPLY_BYTES = MAX_RESPONSE_LENGTH  # bytes in one reply, continuation lines included
MAX_COMMAND = 1000  # characters in one command of ours (RFC 5321: 512 octets a command line; we send less)
CLOSE_WAIT = 2.0  # seconds for QUIT's answer and for the connection to close, before we abort it

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


class SmtpError(Exception):
    """The dialogue cannot go on; the subclass says why."""


class ProtocolError(SmtpError):
    """The peer sent something that is not an SMTP reply, or too much of it."""


class Dropped(SmtpError):
    """The peer closed the connection."""


class Timeout(SmtpError):
    """No complete reply within the command timeout."""


class TlsFailed(SmtpError):
    """The TLS handshake failed."""


class _Refused(SmtpError):
    """aiosmtplib raised a well-formed reply that its step did not expect (only STARTTLS lets it do that)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text after "NNN-" / "NNN ", decoded leniently

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code of the first line, when its class agrees with the reply code."""
        match = _ENHANCED.match(self.lines[0].strip()) if self.lines else None
        if not match or int(match.group(1)) != self.code // 100:
            return None
        return ".".join(match.groups())

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def check_command(line: str) -> str:
    """Refuse a command that could smuggle another one (CR, LF, NUL, other controls) or is overlong.

    aiosmtplib refuses control characters too; this check runs first so that the refusal names the command."""
    if len(line) > MAX_COMMAND or any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
        raise ValueError(f"refusing to send an unsafe SMTP command: {line[:80]!r}")
    return line


def _reply(code: int, message: str) -> Reply:
    """aiosmtplib's (code, message) as a Reply; a code outside 2xx-5xx is not SMTP."""
    if not 200 <= code <= 599:
        raise ProtocolError("not an SMTP reply")
    # aiosmtplib decodes with surrogateescape; stored and served text must be valid UTF-8
    text = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return Reply(code, tuple(text.split("\n")))


class _RecordingProtocol(SMTPProtocol):
    """aiosmtplib's protocol, writing each line it receives or sends into the connection's current transcript."""

    def __init__(self, connection: SmtpConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.connection = connection
        self.partial = bytearray()  # received bytes after the last line end
        self.recording_writes = True
        self.unanswered = 0  # bytes received since our last command
        self.lost: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        # the evidence holds what aiosmtplib may read of one reply; beyond that it fails the reply, and the rest
        # (an endless reply arrives in large chunks) is not recorded
        room = MAX_REPLY_BYTES - self.unanswered
        self.unanswered += len(data)
        if room > 0:
            self.partial += data[:room]
            *lines, rest = bytes(self.partial).split(b"\n")
            for line in lines:
                self.connection.transcript.add("in", line.rstrip(b"\r"))
            self.partial = bytearray(rest)
            if len(data) >= room:
                self.flush()
                self.connection.transcript.info(f"[more than {MAX_REPLY_BYTES} bytes without our next command: "
                                                "the rest is not recorded]")
        super().data_received(data)

    def flush(self) -> None:
        """Record what came after the last line end (a broken connection's last words)."""
        if self.partial:
            self.connection.transcript.add("in", bytes(self.partial))
            self.partial.clear()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unanswered = 0
        if self.recording_writes:
            for line in data.split(b"\r\n")[:-1]:
                self.connection.transcript.add("out", line.decode("ascii", "replace"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.flush()
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


class SmtpConnection:
    """One TCP (or TLS) connection speaking SMTP, writing everything it sees into `transcript`."""

    def __init__(self, host: str, port: int, transcript: Transcript, command_timeout: float) -> None:
        self.host = host
        self.port = port
        self.transcript = transcript  # the session moves it from check to check
        self.command_timeout = command_timeout
        self.protocol: _RecordingProtocol | None = None
        self.tls_subject: str | None = None
        self.tls = False

    async def open(self, connect_timeout: float, implicit_tls: bool = False) -> Reply:
        """Connect and read the greeting. OSError and TimeoutError (refused, unreachable, silent) while connecting
        go to the caller as they are; after that, our errors."""
        loop = asyncio.get_running_loop()
        protocol = _RecordingProtocol(self, loop)
        context = tls_context() if implicit_tls else None
        async with asyncio.timeout(connect_timeout):
            try:
                await loop.create_connection(lambda: protocol, self.host, self.port, ssl=context,
                                             ssl_handshake_timeout=connect_timeout if context else None)
            except ssl.SSLError as exc:
                raise TlsFailed(f"TLS handshake failed: {exc.reason or exc}") from None
        self.protocol = protocol
        if implicit_tls:
            self._note_tls()
        with self._translated():
            response = await protocol.read_response(timeout=self.command_timeout)
        return _reply(response.code, response.message)

    def _note_tls(self) -> None:
        assert self.protocol is not None and self.protocol.transport is not None
        self.tls = True
        ssl_object = self.protocol.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self.tls_subject = certificate_subject(der)
        version = ssl_object.version() if ssl_object else "?"
        self.transcript.info(f"TLS established ({version}); certificate subject: {self.tls_subject or 'none'}")

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """aiosmtplib's errors as ours."""
        try:
            yield
        except (SMTPReadTimeoutError, SMTPTimeoutError):
            raise Timeout(f"no complete reply within {self.command_timeout:g} s") from None
        except SMTPServerDisconnected as exc:
            cause = exc.__cause__
            raise Dropped(f"the connection failed: {cause}" if cause else "the server closed the connection") from None
        except SMTPResponseException as exc:
            if exc.code != SMTPStatus.invalid_response:  # a well-formed refusal (STARTTLS answered other than 220)
                raise _Refused(_reply(exc.code, exc.message)) from None
            if self.protocol is not None:  # "Malformed SMTP response line", "Response too long"
                self.protocol.flush()
            raise ProtocolError(f"not an SMTP reply ({exc.message[:80]})") from None
        except ssl.SSLError as exc:
            raise TlsFailed(f"TLS handshake failed: {exc.reason or exc}") from None
        except (ConnectionError, OSError) as exc:
            raise Dropped(f"the connection failed: {exc}") from None

    async def command(self, line: str) -> Reply:
        if self.protocol is None:
            raise Dropped("the connection is closed")
        command = check_command(line).encode("ascii", "strict")
        with self._translated():
            response = await self.protocol.execute_command(command, timeout=self.command_timeout)
        return _reply(response.code, response.message)

    async def send_message(self, message: bytes) -> Reply:
        """The body after DATA/354 (aiosmtplib's line ends and dot-stuffing, then CRLF.CRLF); then the final reply.
        The transcript shows its size, not the body."""
        if self.protocol is None:
            raise Dropped("the connection is closed")
        stuffed = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
        self.transcript.add("out", f"[message of {len(stuffed)} bytes]")
        self.transcript.add("out", ".")
        with self._translated():
            self.protocol.recording_writes = False
            try:
                self.protocol.write(stuffed + b".\r\n")
            finally:
                self.protocol.recording_writes = True
            response = await self.protocol.read_response(timeout=self.command_timeout)
        return _reply(response.code, response.message)

    async def starttls(self) -> Reply:
        """STARTTLS, then the handshake when the server said 220. Returns the server's reply to STARTTLS; a failed
        or unfinished handshake is TlsFailed."""
        if self.protocol is None:
            raise Dropped("the connection is closed")
        try:
            with self._translated():
                response = await self.protocol.start_tls(tls_context(), timeout=self.command_timeout)
        except _Refused as refused:
            return refused.reply
        except Timeout:
            raise TlsFailed("the TLS handshake did not finish in time") from None
        except Dropped as exc:
            raise TlsFailed(f"TLS handshake failed: {exc}") from None
        self._note_tls()
        return _reply(response.code, response.message)

    async def close(self, quit: bool = True) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return
        if quit and protocol.is_connected:
            with contextlib.suppress(SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError, OSError):
                await protocol.execute_command(b"QUIT", timeout=CLOSE_WAIT)
        transport = protocol.transport
        if transport is not None:
            transport.close()
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await asyncio.shield(protocol.lost)
            except TimeoutError:
                if isinstance(transport, asyncio.WriteTransport):
                    transport.abort()  # a TLS peer that never answers our close
