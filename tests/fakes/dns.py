"""A small authoritative DNS server for tests, on 127.0.0.1 only (UDP and TCP on the same free port).

    async with FakeDns({("example.test", "A"): ["192.0.2.1"],
                        ("example.test", "MX"): ["10 mx1.example.test."]}) as dns_server:
        resolver = Resolver([dns_server.server])            # "127.0.0.1:PORT"
        dns_server.set("example.test", "A", ["10.0.0.1"])   # change an answer at runtime (rebinding)
        dns_server.servfail.add("broken.test")              # answered with SERVFAIL
        dns_server.servfail_types.add(("x.test", "TXT"))    # SERVFAIL for that type only
        dns_server.slow.add("slow.test")                    # never answered (timeouts)
        assert ("example.test", "A") in dns_server.queries  # every question asked, lower case, no final dot

Names are case-insensitive. A name with no records of any type is NXDOMAIN; a name with records of other types
only is NOERROR with an empty answer. Records go out in the order given (duplicates dropped), or rotated like a
real server's with shuffle=True. A CNAME is followed (bounded) and the whole chain is answered. A UDP answer
larger than the client can take (512 bytes, or its EDNS payload up to 1232) is sent truncated (TC), so the
client retries over TCP (2-byte length framing). Malformed packets are ignored. Every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"
TTL = 60
MAX_CNAME_CHAIN = 8
MAX_QUERY_BYTES = 4096  # a query is one question; anything larger is not one of ours
MAX_UDP_ANSWER = 1232  # the largest UDP answer we send, whatever the client's EDNS payload says
MAX_TCP_MESSAGES = 100  # per connection
TCP_IDLE_SECONDS = 10.0
PORT_ATTEMPTS = 20


def _norm(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else str(name)
    return text.strip().rstrip(".").lower()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: "FakeDns") -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) > MAX_QUERY_BYTES or self.transport is None:
            return
        wire = self.owner._answer(data, tcp=False)
        if wire is not None:
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable from a gone client
        pass


class FakeDns:
    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None, shuffle: bool = False) -> None:
        self.shuffle = shuffle  # False: records in the order given (deterministic); True: rotated, like real servers
        self._records: dict[tuple[str, str], list[str]] = {}
        for (name, rdtype), values in (records or {}).items():
            self.set(name, rdtype, values)
        self.servfail: set[str] = set()
        self.servfail_types: set[tuple[str, str]] = set()  # (name, TYPE): SERVFAIL for that type only
        self.slow: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []  # the subset asked over TCP
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- records ---------------------------------------------------------------------------------------------

    def set(self, name: str, rdtype: str, values: Iterable[str]) -> None:
        """Answer (name, rdtype) with these rdata texts from now on (relative names are taken as absolute)."""
        key = (_norm(name), rdtype.upper())
        self._records[key] = list(values)
        if not self._records[key]:
            del self._records[key]  # no values: the same as remove()
            return
        try:
            self._rrset(*key)  # a typo fails here, in the test, not silently in the server
        except Exception:
            del self._records[key]
            raise

    def remove(self, name: str, rdtype: str) -> None:
        self._records.pop((_norm(name), rdtype.upper()), None)

    @property
    def server(self) -> str:
        return f"{HOST}:{self.port}"

    # -- answering -------------------------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        return any(owner == name for owner, _type in self._records)

    def _rrset(self, name: str, rdtype: str) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(dns.name.from_text(name), TTL, dns.rdataclass.IN, rdtype,
                                        self._records[(name, rdtype)], origin=dns.name.root, relativize=False)

    def _answer(self, wire: bytes, tcp: bool) -> bytes | None:
        """The wire answer to one query, or None to stay silent (malformed, not a query, or a slow name)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError):
            return None
        if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return None
        question = query.question[0]
        qname, qtype = _norm(question.name), dns.rdatatype.to_text(question.rdtype)
        self.queries.append((qname, qtype))
        if tcp:
            self.tcp_queries.append((qname, qtype))
        if qname in self.slow:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if qname in self.servfail or (qname, qtype) in self.servfail_types:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        current = qname
        for _ in range(MAX_CNAME_CHAIN):
            if (current, qtype) in self._records:
                response.answer.append(self._rrset(current, qtype))
                break
            if qtype != "CNAME" and (current, "CNAME") in self._records:
                cname = self._rrset(current, "CNAME")
                response.answer.append(cname)
                current = _norm(cname[0].target)
                continue
            if not self._exists(current):
                response.set_rcode(dns.rcode.NXDOMAIN)
            break
        if tcp:
            return response.to_wire(max_size=65535, want_shuffle=self.shuffle)
        limit = 512
        if query.edns >= 0:
            limit = max(512, min(query.payload, MAX_UDP_ANSWER))
        try:
            return response.to_wire(max_size=limit, want_shuffle=self.shuffle)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            truncated.flags &= ~dns.flags.RA
            return truncated.to_wire(max_size=limit)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            for _ in range(MAX_TCP_MESSAGES):
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS)
                    size = int.from_bytes(head, "big")
                    if size == 0 or size > MAX_QUERY_BYTES:
                        return
                    data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_SECONDS)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                wire = self._answer(data, tcp=True)
                if wire is None:
                    continue  # slow or malformed: say nothing, the client times out
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket bound to the same free loopback port."""
        for _ in range(PORT_ATTEMPTS):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((HOST, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError(f"no loopback port free for both UDP and TCP after {PORT_ATTEMPTS} attempts")

    async def __aenter__(self) -> "FakeDns":
        udp, tcp = self._bind_pair()
        self.port = udp.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 5)
            self._tcp = None
