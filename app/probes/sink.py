"""Our sink: the SMTP server where relayed probe messages land. An arrival proves that a relay really delivers.

It accepts only recipients at SECURE_PROBE_DOMAIN whose local part is a probe tag, reads at most 64 KiB per
message, and records which tags arrived. `on_delivery` is awaited for every arrival (the audit lifecycle uses it
to mark the check `delivered`, also after the audit has finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

TAG = re.compile(r"^sys[0-9a-f]{16}$")
TAG_HEADER = "X-Secure-Your-Server-Tag"
MAX_MESSAGE = 64 * 1024
MAX_REMEMBERED = 10000

log = logging.getLogger("secure.sink")


def new_tag() -> str:
    """A per-check tag, used as the local part of our sink address (letters and digits only: it survives
    percent hacks, bang paths and quoting)."""
    return "sys" + secrets.token_hex(8)


class Sink:
    def __init__(self, probe_domain: str,
                 on_delivery: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.probe_domain = probe_domain.lower().rstrip(".")
        self.on_delivery = on_delivery
        self.arrivals: OrderedDict[str, float] = OrderedDict()
        self._changed = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(
            lambda: SMTP(handler, hostname=self.probe_domain, data_size_limit=MAX_MESSAGE, enable_SMTPUTF8=False,
                         ident="Secure Your Server sink", timeout=30),
            host=host, port=port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def tag_of(self, address: str) -> str | None:
        local, _, domain = address.rpartition("@")
        local = local.strip('"').lower()
        if domain.lower().rstrip(".") == self.probe_domain and TAG.match(local):
            return local
        return None

    async def record(self, tag: str) -> None:
        if tag in self.arrivals:
            return
        self.arrivals[tag] = time.time()
        while len(self.arrivals) > MAX_REMEMBERED:
            self.arrivals.popitem(last=False)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        log.info("sink.delivered", extra={"tag": tag})
        if self.on_delivery is not None:
            try:
                await self.on_delivery(tag)
            except Exception:
                log.exception("sink.on_delivery_failed", extra={"tag": tag})

    async def wait_for(self, tags: Iterable[str], timeout: float) -> set[str]:
        """The tags among `tags` that arrived, waiting up to `timeout` seconds for all of them."""
        wanted = set(tags)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            arrived = wanted & self.arrivals.keys()
            remaining = deadline - loop.time()
            if arrived == wanted or remaining <= 0:
                return arrived
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.sink.tag_of(address) is None:
            return "550 5.1.1 This server accepts only Secure Your Server test messages"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        tags = {tag for tag in (self.sink.tag_of(a) for a in envelope.rcpt_tos) if tag}
        content: Any = envelope.original_content or b""
        for line in bytes(content)[:MAX_MESSAGE].split(b"\n")[:200]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == TAG_HEADER.lower().encode():
                value_text = value.strip().decode("ascii", "replace").lower()
                if TAG.match(value_text):
                    tags.add(value_text)
        for tag in tags:
            await self.sink.record(tag)
        return "250 2.0.0 Received, thank you"
