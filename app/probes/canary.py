"""Our canaries: what proxies under test are asked to reach. Each answers a per-check token that only it can make.

The token of a check is an HMAC of the check id under the server secret. We never send it: a server that echoes
our request back cannot forge it, so a token that comes back through a proxy proves the proxy reached the canary.
- HTTP canary: GET /canary/<check id> answers the token (on the app, and on its own listener when configured).
- SMTP canary: greets neutrally and answers `EHLO <check id>` with `250 <token>`; it accepts no mail.
- TLS canary: the HTTP canary inside TLS (a self-signed certificate made at start).
Every canary records the source address of the connections that named a check id: a second proof that the
traffic came through the target.
With SECURE_LISTENERS=external the canaries run in their own process: each observation is also written to the
store (a Journal), where the process that ran the check reads it (Canary.observed).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import re
import secrets
import ssl
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

CHECK_ID = re.compile(r"^cid[0-9a-f]{16}$")
MAX_REMEMBERED = 10000
MAX_LINE = 1024
MAX_LINES = 60  # an HTTP POST's request line and headers reach the SMTP canary too
READ_TIMEOUT = 15.0


class Journal(Protocol):
    """Where observations are shared between processes (app.store.Store)."""

    async def record_observation(self, kind: str, key: str, source: str = "", via: str = "") -> None: ...

    async def observed(self, kind: str, keys: Iterable[str]) -> dict[str, list[str]]: ...


class Canary:
    """Tokens and the record of who reached us; shared by every canary listener and the app's route. `journal`:
    where observations are shared with the other processes of the site (None: this process alone)."""

    def __init__(self, secret: str, journal: Journal | None = None) -> None:
        self.journal = journal
        self._key = hashlib.sha256(b"canary:" + secret.encode()).digest()
        self.sources: OrderedDict[str, list[tuple[str, str, float]]] = OrderedDict()
        self.connections: deque[tuple[str, str, float]] = deque(maxlen=MAX_REMEMBERED)  # every one, named or not

    def connected(self, source: str, via: str) -> None:
        self.connections.append((source, via, time.time()))

    def new_check_id(self) -> str:
        """A fresh check id that this site issued: 8 random hex digits and 8 of their HMAC, so that only ids of our
        own checks are written to the shared journal (a stranger's request for any other id costs no write)."""
        nonce = secrets.token_hex(4)
        return "cid" + nonce + self._mac(nonce)

    def issued(self, check_id: str) -> bool:
        return bool(CHECK_ID.match(check_id)) and hmac.compare_digest(check_id[11:], self._mac(check_id[3:11]))

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._key, b"id:" + nonce.encode(), hashlib.sha256).hexdigest()[:8]

    def token(self, check_id: str) -> str:
        return "tok" + hmac.new(self._key, check_id.encode(), hashlib.sha256).hexdigest()[:32]

    def record(self, check_id: str, source: str, via: str) -> None:
        """`via`: which canary saw it (http, smtp, tls)."""
        if not CHECK_ID.match(check_id):
            return
        entries = self.sources.setdefault(check_id, [])
        if len(entries) < 20:
            entries.append((source, via, time.time()))
        self.sources.move_to_end(check_id)
        while len(self.sources) > MAX_REMEMBERED:
            self.sources.popitem(last=False)

    def seen_from(self, check_id: str) -> list[str]:
        return sorted({source for source, _via, _t in self.sources.get(check_id, [])})

    async def note(self, check_id: str, source: str, via: str) -> None:
        """record(), and into the journal before the caller answers: the token never comes back before it."""
        self.record(check_id, source, via)
        if self.journal is not None and self.issued(check_id):
            await self.journal.record_observation("canary", check_id, source, via)

    async def observed(self, check_id: str) -> list[str]:
        """Where the check was seen from: by this process's canaries, or by any process's through the journal."""
        if self.journal is None:
            return self.seen_from(check_id)
        shared = await self.journal.observed("canary", [check_id])
        return sorted(set(self.seen_from(check_id)) | set(shared.get(check_id, [])))


class _CanaryListener:
    """What every canary listener shares: the canary, its server, and the record of each connection."""

    def __init__(self, canary: Canary, via: str) -> None:
        self.canary = canary
        self.via = via
        self._server: asyncio.base_events.Server | None = None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _connected(self, writer: asyncio.StreamWriter) -> str:
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else "?"
        self.canary.connected(source, self.via)
        return source


# --- the SMTP canary ---------------------------------------------------------------------------------------
class SmtpCanary(_CanaryListener):
    def __init__(self, canary: Canary) -> None:
        super().__init__(canary, "smtp")

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = self._connected(writer)
        try:
            writer.write(b"220 canary ready\r\n")
            await writer.drain()
            for _ in range(MAX_LINES):
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                except (ValueError, asyncio.LimitOverrunError):
                    break
                if not line:
                    break
                words = line.decode("ascii", "replace").strip().split()
                if not words:
                    continue  # the extra CRLF some proxies need after CONNECT
                verb = words[0].upper()
                if verb in ("EHLO", "HELO") and len(words) == 2 and CHECK_ID.match(words[1]):
                    await self.canary.note(words[1], source, "smtp")
                    writer.write(f"250 {self.canary.token(words[1])}\r\n".encode())
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 5.5.2 this server only answers EHLO\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


# --- the HTTP canary (its own listener, plain or TLS) ------------------------------------------------------
_REQUEST = re.compile(rb"^(GET|HEAD|POST) (?:https?://[^/\s]+)?/canary/(cid[0-9a-f]{16}) HTTP/1\.[01]\r?$")


class HttpCanary(_CanaryListener):
    def __init__(self, canary: Canary, via: str = "http") -> None:
        super().__init__(canary, via)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE * 8, ssl=ssl_context,
                                                  ssl_handshake_timeout=READ_TIMEOUT if ssl_context else None)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = self._connected(writer)
        try:
            first = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            for _ in range(MAX_LINES):  # the headers: read and ignore
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                if line in (b"\r\n", b"\n", b""):
                    break
            match = _REQUEST.match(first.rstrip(b"\n"))
            if match:
                check_id = match.group(2).decode()
                await self.canary.note(check_id, source, self.via)
                body = self.canary.token(check_id).encode() + b"\n"
                status = b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()


def self_signed_context(common_name: str = "canary.invalid") -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate (proxies and our probe never verify it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only
        cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_file, key_file)
    return context
