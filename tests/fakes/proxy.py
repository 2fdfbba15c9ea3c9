"""Small asyncio proxies and impostors for the behaviours real proxies show only on bad days.

The forwarding fake is a real (tiny) HTTP proxy: CONNECT, absolute-URI GET and POST, relayed byte for byte. It only
ever connects to 127.0.0.1 (anything else is refused), listens on 127.0.0.1, and every read is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import contextlib

MAX_HEAD = 16 * 1024


class FakeServer:
    """Base: a loopback server whose `handle` is the behaviour."""

    listen_host = "127.0.0.1"

    def __init__(self) -> None:
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self.connections = 0

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await asyncio.wait_for(self.handle(reader, writer), 30)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise ValueError("head too long")
    return head


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            data = await src.read(4096)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    with contextlib.suppress(Exception):
        dst.write_eof()


class ForwardingProxy(FakeServer):
    """An open HTTP proxy. `one_byte_writes`: every reply byte in its own packet. `needs_extra_crlf`: like
    MikroTik, it acts on a CONNECT only after one more empty line."""

    def __init__(self, one_byte_writes: bool = False, needs_extra_crlf: bool = False) -> None:
        super().__init__()
        self.one_byte_writes = one_byte_writes
        self.needs_extra_crlf = needs_extra_crlf

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.one_byte_writes:
            writer.write(data)
            await writer.drain()
            return
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        request_line, _, rest = head.decode("latin-1").partition("\r\n")
        method, target, _version = request_line.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            if self.needs_extra_crlf:
                extra = await reader.readuntil(b"\r\n")
                if extra != b"\r\n":
                    return
            if host.strip("[]") != "127.0.0.1":
                await self._write(writer, b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
            await self._write(writer, b"HTTP/1.1 200 Connection established\r\nProxy-Agent: fakeproxy/1.0\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), self._relay(up_reader, writer))
            return
        if not target.startswith("http://"):
            await self._write(writer, b"HTTP/1.1 400 Bad Request\r\n\r\n")
            return
        hostport, _, path = target[len("http://"):].partition("/")
        host, _, port = hostport.rpartition(":")
        if host.strip("[]") != "127.0.0.1":
            await self._write(writer, b"HTTP/1.1 403 Forbidden\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port or 80))
        up_writer.write(f"{method} /{path} HTTP/1.0\r\n{rest}".encode("latin-1"))
        length = next((int(line.split(":", 1)[1]) for line in rest.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        if length:
            up_writer.write(await reader.readexactly(min(length, 4096)))
        await up_writer.drain()
        await self._relay(up_reader, writer)

    async def _relay(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await src.read(4096)
                if not data:
                    break
                await self._write(dst, data)


class WebServer(FakeServer):
    """An ordinary web server that answers 200 and a page to anything, CONNECT included."""

    async def handle(self, reader, writer):
        await _read_head(reader)
        body = b"<html><body>Welcome to our shop</body></html>"
        writer.write(b"HTTP/1.1 200 OK\r\nServer: Apache/2.4.57 (Debian)\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()


class Socks5Denied(FakeServer):
    """SOCKS5 without authentication, whose rules refuse our destination (reply 02)."""

    async def handle(self, reader, writer):
        greeting = await reader.readexactly(2)
        if greeting[0] != 5:
            return
        await reader.readexactly(greeting[1])
        writer.write(b"\x05\x00")
        await writer.drain()
        request = await reader.readexactly(4)
        await reader.readexactly({1: 4, 4: 16}.get(request[3], 0) + 2 if request[3] != 3
                                 else (await reader.readexactly(1))[0] + 2)
        writer.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
        await writer.drain()


class Tarpit(FakeServer):
    """Accepts and never says a word."""

    async def handle(self, reader, writer):
        await asyncio.sleep(30)


class ResetsSocks(FakeServer):
    """Answers HTTP like a web server, and resets the connection (RST, not FIN) on anything else: what Dante with a
    client rule that blocks us, or an HTTP proxy that does not speak SOCKS4, do to a SOCKS4 request."""

    async def handle(self, reader, writer):
        first = await reader.read(1)
        if first in (b"\x04", b"\x05"):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        await _read_head(reader)
        writer.write(b"HTTP/1.1 404 Not Found\r\nServer: Apache/2.4.62 (Debian)\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()


class Garbage(FakeServer):
    async def handle(self, reader, writer):
        writer.write(bytes(range(256)) * 4)
        await writer.drain()
        await asyncio.sleep(0.2)


class AuthRequired(FakeServer):
    """An HTTP proxy that wants a login (407) for everything."""

    async def handle(self, reader, writer):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n"
                     b"Server: squid/5.7\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()


class EchoServer(FakeServer):
    """Echoes our own request back with 200: it must never forge the token (we never send it)."""

    async def handle(self, reader, writer):
        head = await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + head)
        await writer.drain()


class WinGate(FakeServer):
    """A telnet-style gateway: prompts, takes `host:port`, connects there (loopback only) and pipes."""

    async def handle(self, reader, writer):
        writer.write(b"\xff\xfb\x01WinGate Engine\r\nWinGate>")
        await writer.drain()
        line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        host, _, port = line.rpartition(":")
        if host != "127.0.0.1":
            writer.write(b"\r\nRefused\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"\r\nConnecting to host " + line.encode() + b"...Connected\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


# --- impostors: they say yes, then play our mail canary themselves ------------------------------------------
IMPOSTOR_BANNER = b"220 mail.impostor.example ESMTP ready\r\n"


async def _play_mail_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greet like a mail server and answer EHLO with a friendly reply that even repeats our check id: everything a
    real tunnel to our canary would show, except the canary's token (which only our canary can make)."""
    writer.write(IMPOSTOR_BANNER)
    await writer.drain()
    for _ in range(10):  # bounded
        line = await reader.readline()
        if not line:
            return
        words = line.decode("latin-1").split()
        if not words:
            continue
        if words[0].upper() in ("EHLO", "HELO"):
            name = words[1] if len(words) > 1 else "you"
            writer.write(f"250-mail.impostor.example Hello {name}\r\n250-PIPELINING\r\n250 8BITMIME\r\n".encode())
        elif words[0].upper() == "QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"250 OK\r\n")
        await writer.drain()


class HttpImpostor(FakeServer):
    """Answers CONNECT with 200 and then greets with its own SMTP banner (no tunnel); answers POST with 200 and a
    mail dialogue in the body. With `tls`, it does the same inside TLS (an HTTPS proxy impostor)."""

    def __init__(self, tls: bool = False) -> None:
        super().__init__()
        self.tls = tls

    async def __aenter__(self):
        if not self.tls:
            return await super().__aenter__()
        from app.probes.canary import self_signed_context

        self._server = await asyncio.start_server(self._accept, self.listen_host, 0, ssl=self_signed_context(),
                                                  ssl_handshake_timeout=5)
        return self

    async def handle(self, reader, writer):
        head = await _read_head(reader)
        method = head.split(b" ", 1)[0]
        if method == b"CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _play_mail_server(reader, writer)
        elif method == b"POST":
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + IMPOSTOR_BANNER
                         + b"250-mail.impostor.example Hello\r\n250 8BITMIME\r\n221 bye\r\n")
            await writer.drain()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()


class SocksImpostor(FakeServer):
    """Grants every SOCKS4, SOCKS4a and SOCKS5 request (no login), then greets with its own SMTP banner."""

    async def handle(self, reader, writer):
        version = (await reader.readexactly(1))[0]
        if version == 5:
            methods = (await reader.readexactly(1))[0]
            await reader.readexactly(methods)
            writer.write(b"\x05\x00")
            await writer.drain()
            request = await reader.readexactly(4)
            if request[3] == 3:
                await reader.readexactly((await reader.readexactly(1))[0] + 2)
            else:
                await reader.readexactly({1: 4, 4: 16}.get(request[3], 0) + 2)
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x19")
        elif version == 4:
            request = await reader.readexactly(7)  # command, port, address
            await reader.readuntil(b"\x00")  # user id
            if request[3:6] == b"\x00\x00\x00" and request[6] != 0:  # SOCKS4a: the name follows
                await reader.readuntil(b"\x00")
            writer.write(b"\x00\x5a\x00\x19\x7f\x00\x00\x01")
        else:
            return
        await writer.drain()
        await _play_mail_server(reader, writer)


class WinGateImpostor(FakeServer):
    """A gateway prompt that says "Connected" to any `host:port` and then greets with its own SMTP banner."""

    async def handle(self, reader, writer):
        writer.write(b"WinGate Engine\r\nWinGate>")
        await writer.drain()
        line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        writer.write(b"\r\nConnecting to host " + line.encode() + b"...Connected\r\n")
        await writer.drain()
        await _play_mail_server(reader, writer)
