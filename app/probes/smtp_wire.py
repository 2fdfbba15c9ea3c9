"""SMTP on the wire, for probing hostile servers: bounded reads, full reply parsing, exact transcripts.

Replies are parsed per RFC 5321 section 4.2 (multi-line `NNN-`, final `NNN `, enhanced status code of RFC 3463),
never matched by substring. Every read is bounded in bytes and time; a command can never carry CR or LF.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import warnings
from dataclasses import dataclass

from app.probes.transcript import Transcript

MAX_LINE = 2048  # bytes in one reply line (RFC 5321 allows 512; we are lenient, not unbounded)
MAX_REPLY_LINES = 64
MAX_REPLY_BYTES = 16 * 1024
MAX_COMMAND = 1000

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
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
    """Refuse a command that could smuggle another one (CR, LF, NUL, other controls) or is overlong."""
    if len(line) > MAX_COMMAND or any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
        raise ValueError(f"refusing to send an unsafe SMTP command: {line[:80]!r}")
    return line


def tls_context() -> ssl.SSLContext:
    """We test relaying, not TLS: accept any certificate and old protocol versions, but record the subject."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():  # old servers still speak TLS 1.0; we only need the channel
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pass
    return context


def certificate_subject(der: bytes | None) -> str | None:
    if not der:
        return None
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        return cert.subject.rfc4514_string()[:300]
    except Exception:  # noqa: BLE001 - a malformed certificate is evidence too, not a crash
        return "(unreadable certificate)"


class SmtpConnection:
    """One TCP (or TLS) connection speaking SMTP, writing everything it sees into `transcript`."""

    def __init__(self, host: str, port: int, transcript: Transcript, command_timeout: float) -> None:
        self.host = host
        self.port = port
        self.transcript = transcript
        self.command_timeout = command_timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tls_subject: str | None = None
        self.tls = False

    async def open(self, connect_timeout: float, implicit_tls: bool = False) -> None:
        """Connect; OSError and TimeoutError (refused, unreachable, silent) go to the caller."""
        context = tls_context() if implicit_tls else None
        async with asyncio.timeout(connect_timeout):
            try:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, ssl=context, limit=MAX_LINE,
                    ssl_handshake_timeout=connect_timeout if context else None)
            except ssl.SSLError as exc:
                raise TlsFailed(f"TLS handshake failed: {exc.reason or exc}") from None
        if implicit_tls:
            self._note_tls()

    def _note_tls(self) -> None:
        assert self.writer is not None
        self.tls = True
        ssl_object = self.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self.tls_subject = certificate_subject(der)
        version = ssl_object.version() if ssl_object else "?"
        self.transcript.info(f"TLS established ({version}); certificate subject: {self.tls_subject or 'none'}")

    async def read_reply(self) -> Reply:
        assert self.reader is not None
        lines: list[str] = []
        code: bytes | None = None
        total = 0
        try:
            async with asyncio.timeout(self.command_timeout):
                while True:
                    try:
                        raw = await self.reader.readuntil(b"\n")
                    except asyncio.LimitOverrunError:
                        raise ProtocolError(f"a reply line longer than {MAX_LINE} bytes") from None
                    except asyncio.IncompleteReadError as exc:
                        if exc.partial:
                            self.transcript.add("in", exc.partial)
                        raise Dropped("the server closed the connection") from None
                    except (ConnectionError, OSError) as exc:
                        raise Dropped(f"the connection failed: {exc}") from None
                    self.transcript.add("in", raw.rstrip(b"\r\n"))
                    total += len(raw)
                    match = _REPLY_LINE.match(raw.rstrip(b"\r\n"))
                    if not match:
                        raise ProtocolError("not an SMTP reply")
                    if code is not None and match.group(1) != code:
                        raise ProtocolError("the lines of one reply carry different codes")
                    code = match.group(1)
                    lines.append(match.group(3).decode("utf-8", "replace"))
                    if match.group(2) != b"-":
                        return Reply(int(code), tuple(lines))
                    if len(lines) >= MAX_REPLY_LINES or total >= MAX_REPLY_BYTES:
                        raise ProtocolError(f"a reply of more than {len(lines)} lines / {total} bytes")
        except TimeoutError:
            raise Timeout(f"no complete reply within {self.command_timeout:g} s") from None

    async def send(self, line: str) -> None:
        assert self.writer is not None
        check_command(line)
        self.transcript.add("out", line)
        try:
            self.writer.write(line.encode("ascii", "strict") + b"\r\n")
            async with asyncio.timeout(self.command_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise Timeout("the server stopped reading our commands") from None
        except (ConnectionError, OSError) as exc:
            raise Dropped(f"the connection failed: {exc}") from None

    async def command(self, line: str) -> Reply:
        await self.send(line)
        return await self.read_reply()

    async def send_message(self, message: bytes) -> Reply:
        """The body after DATA/354: dot-stuffed, CRLF line ends, ending with CRLF.CRLF; then the final reply."""
        assert self.writer is not None
        lines = message.replace(b"\r\n", b"\n").split(b"\n")
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
        self.transcript.add("out", f"[message of {len(stuffed)} bytes]")
        self.transcript.add("out", ".")
        try:
            self.writer.write(stuffed + b"\r\n.\r\n")
            async with asyncio.timeout(self.command_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise Timeout("the server stopped reading the message") from None
        except (ConnectionError, OSError) as exc:
            raise Dropped(f"the connection failed: {exc}") from None
        return await self.read_reply()

    async def starttls(self) -> None:
        assert self.writer is not None
        try:
            async with asyncio.timeout(self.command_timeout):
                await self.writer.start_tls(tls_context())
        except TimeoutError:
            raise TlsFailed("the TLS handshake did not finish in time") from None
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise TlsFailed(f"TLS handshake failed: {exc}") from None
        self._note_tls()

    async def close(self, quit: bool = True) -> None:
        if self.writer is None:
            return
        if quit and not self.writer.is_closing():
            try:
                await self.send("QUIT")
                async with asyncio.timeout(2):
                    await self.read_reply()
            except (SmtpError, TimeoutError):
                pass
        self.writer.close()
        try:
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            pass
        self.writer = None
