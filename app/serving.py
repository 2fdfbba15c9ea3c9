"""What `serve` hands uvicorn: connection limits, and an h11 protocol that bounds how long a request may take to
arrive and how many connections one address (and everyone) may hold.

uvicorn alone has no timeout for a request head: a client that sends half a request line holds its connection (and
a file descriptor) forever, and a few hundred of them starve the site. Its `limit_concurrency` does not help there:
it never refuses a connection, it answers `503` to the next *request* once the open connections or running request
tasks reach it, so idle connections make every real visitor's request fail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app import logs
from app.config import Settings

FD_RESERVE = 64  # descriptors kept for the database, the sink and canaries, outgoing probes and logs
log = logs.get_logger("serve")  # per-connection refusals log at debug: a flood must not flood the log too


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request timer, a per-address cap and a total cap with eviction.

    The class attributes are set on a subclass per server by `guarded_protocol`."""

    head_timeout: float = 10.0
    max_connections: int = 1000
    per_peer: int = 32
    max_head: int = 16384
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    peers: dict[str, int]  # open connections per peer address
    waiting: dict[GuardedH11Protocol, None]  # connections whose request has not fully arrived, oldest first

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._counted = True
        self._peer = self.client[0] if self.client else ""
        self.peers[self._peer] = self.peers.get(self._peer, 0) + 1
        if self.peers[self._peer] > self.per_peer and not self._exempt():
            log.debug("connection.refused", extra={"reason": "per_peer", "peer": self._peer})
            self._close()
            return
        if len(self.connections) > self.max_connections and not self._evict_oldest_waiting():
            log.debug("connection.refused", extra={"reason": "max_connections", "peer": self._peer})
            self._close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._uncount()
        super().connection_lost(exc)

    def _close(self) -> None:
        """Close, and stop counting this connection now: `connection_lost` only comes on a later turn of the loop,
        and a burst accepted in one turn would otherwise see refused connections as held ones and evict a kept
        one (or refuse a newcomer) to make room for them."""
        self._disarm()
        self._uncount()
        self.transport.close()

    def _uncount(self) -> None:
        if not self._counted:
            return
        self._counted = False
        self.connections.discard(self)
        count = self.peers.get(self._peer, 0) - 1
        if count > 0:
            self.peers[self._peer] = count
        else:
            self.peers.pop(self._peer, None)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            return
        super().data_received(data)
        if self._timer is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in: what follows is the app's time, not the client's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request on this keep-alive connection gets the same bound (a pipelined one may already be in)
        if not self.transport.is_closing() and self._timer is None and self.conn.their_state in (h11.IDLE,
                                                                                              h11.SEND_BODY):
            self._arm()

    def _head_too_large(self, data: bytes) -> bool:
        """h11's own cap only counts a head still incomplete after a read; a large head sent at once passes it."""
        pending = self.conn.trailing_data[0] + data
        if len(pending) <= self.max_head or b"\r\n\r\n" in pending[:self.max_head + 4]:
            return False
        body = b"Request head too large.\n"
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                             b"charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        self._close()
        return True

    def _exempt(self) -> bool:
        """Trusted proxies carry everyone's connections: capping them per address would cap the whole site."""
        try:
            address = ipaddress.ip_address(self._peer)
        except ValueError:
            return False
        return any(address in network for network in self.exempt)

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.head_timeout, self._timed_out)
        self.waiting[self] = None

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.waiting.pop(self, None)

    def _timed_out(self) -> None:
        self._timer = None
        self.waiting.pop(self, None)  # even when already closing: never evicted for room it does not hold
        if not self.transport.is_closing():
            self._close()

    def _evict_oldest_waiting(self) -> bool:
        """At the cap, the connection that has waited longest for its request makes room (slowloris first)."""
        for other in self.waiting:
            if other is not self:
                other._close()
                log.debug("connection.evicted", extra={"peer": other._peer})
                return True
        return False


def max_connections(settings: Settings) -> int:
    """SECURE_MAX_HTTP_CONNECTIONS, but never more than the process may open (RLIMIT_NOFILE minus a reserve)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_http_connections
    return max(8, min(settings.max_http_connections, soft - FD_RESERVE))


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    attributes: dict[str, Any] = {
        "head_timeout": settings.request_head_timeout, "max_connections": max_connections(settings),
        "per_peer": settings.max_connections_per_peer,
        "max_head": settings.max_header_bytes, "exempt": tuple(settings.trusted_proxy_networks),
        "peers": {}, "waiting": {}}
    return type("ServedH11Protocol", (GuardedH11Protocol,), attributes)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    protocol = guarded_protocol(settings)
    return {
        "http": protocol,
        # a backstop: our protocol keeps connections at or below max_connections, so uvicorn's 503 answers only
        # come when running request tasks (which can outlive their connection) pile up beyond it
        "limit_concurrency": protocol.max_connections + 1,
        "timeout_keep_alive": settings.keep_alive_timeout,
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # h11's own check (400), besides ours (431)
    }
