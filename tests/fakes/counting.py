"""Loopback servers that count what reaches them: the "victim" side of the abuse tests and bench/abuse.py."""

from __future__ import annotations

import asyncio


class CountingWeb:
    """An HTTP server on port 80 of a loopback address that counts the GETs reaching it (the "victim" of verification fetches)."""

    def __init__(self, host: str = "127.0.0.3") -> None:
        self.host = host
        self.requests = 0

    async def __aenter__(self) -> "CountingWeb":
        try:
            self.server = await asyncio.start_server(self.handle, self.host, 80)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {self.host}:80 (run as root): {exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.requests += 1
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()


class CountingSmtp:
    """A tiny SMTP server refusing relay, recording how many connections it holds at once."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.now = self.most = self.total = 0

    async def __aenter__(self) -> "CountingSmtp":
        self.server = await asyncio.start_server(self.handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.now += 1
        self.total += 1
        self.most = max(self.most, self.now)
        try:
            writer.write(b"220 counting ESMTP\r\n")
            for _ in range(200):  # bounded
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line:
                    break
                verb = line[:4].upper()
                await asyncio.sleep(0.01)  # a little work per command, so connections overlap
                if verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                reply = {b"RCPT": b"554 5.7.1 Relay access denied\r\n", b"DATA": b"503 no recipients\r\n"}
                writer.write(reply.get(verb, b"250 ok\r\n"))
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            self.now -= 1
            writer.close()
