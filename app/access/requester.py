"""The requester's address: the socket peer, or what a configured trusted proxy says it forwarded for.

The address is also the test target of a `self` audit, so a forwarding header is believed only from a peer in
SECURE_TRUSTED_PROXIES, walking the chain from the right and stopping at the first hop we do not trust.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from starlette.requests import Request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS = 20  # a longer chain is junk or an attack; we read no further


class RequesterError(ValueError):
    """The request's own address or its forwarding headers cannot be read."""


def parse_address(text: str) -> IPAddress:
    """An address as it may appear in a peer or header: plain, [v6], with a port, or v6 with a zone."""
    value = text.strip().strip('"')
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.split(":", 1)[0]
    value = value.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise RequesterError(f"not an IP address: {text[:60]!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


_FORWARDED_FOR = re.compile(r'(?:^|[;,\s])for=("[^"]*"|[^;,\s]*)', re.IGNORECASE)


def forwarded_chain(request: Request, header: str = "x-forwarded-for") -> list[str]:
    """The client addresses that proxies added to `header` (X-Forwarded-For or RFC 7239 Forwarded), oldest first.

    Only the header the trusted proxies are configured to set is read: a proxy passes on the other one
    untouched, so a client could write anything there.
    """
    chain: list[str] = []
    if header == "forwarded":
        for value in request.headers.getlist("forwarded"):
            for element in value.split(","):
                match = _FORWARDED_FOR.search(element)
                chain.append(match.group(1) if match else "unknown")
        return chain
    for value in request.headers.getlist("x-forwarded-for"):
        chain.extend(part.strip() for part in value.split(",") if part.strip())
    return chain


def _trusted(address: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def requester_address(request: Request, trusted: Sequence[Network], header: str = "x-forwarded-for") -> IPAddress:
    if request.client is None or not request.client.host:
        raise RequesterError("the connection has no peer address")
    current = parse_address(request.client.host)
    if not trusted or not _trusted(current, trusted):
        return current
    chain = forwarded_chain(request, header)
    if len(chain) > MAX_HOPS:
        raise RequesterError("too many forwarding hops")
    for hop in reversed(chain):
        if not _trusted(current, trusted):
            break
        current = parse_address(hop)  # a trusted proxy sent junk: refuse rather than guess
    return current
