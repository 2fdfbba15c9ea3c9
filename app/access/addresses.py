"""One spelling per address: what limits count and what the budget of a target address is keyed by.

An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address itself: the same server, reached the same way,
so it is tested (and counted) as `a.b.c.d`. Other forms that carry an IPv4 address (NAT64 `64:ff9b::a.b.c.d`,
the deprecated `::a.b.c.d`) are still reached through their own route, but they land on the same server, so they
share its budget. IPv6 requesters are counted per prefix (default /64): one subscriber holds a whole /64.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix (RFC 6052)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed)
    return None


def normalise(text: str | IPAddress) -> str:
    """The address as we test it: `::ffff:a.b.c.d` -> `a.b.c.d`; IPv6 in its compressed form."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def budget_key(text: str | IPAddress) -> str:
    """The server an address lands on: its embedded IPv4 address for mapped, NAT64 and IPv4-compatible forms."""
    address = ipaddress.ip_address(text)
    # 6to4 and Teredo also carry an IPv4 address, but of a relay or a NAT on the way, not of the server
    if isinstance(address, ipaddress.IPv6Address) and not (address.sixtofour or address.teredo):
        inner = embedded_ipv4(address)
        if inner is not None:
            return str(inner)
    return str(address)


def unique(addresses: Iterable[str]) -> list[str]:
    """Normalised, in order, one per server (the first spelling of a budget key wins)."""
    seen: set[str] = set()
    kept: list[str] = []
    for text in addresses:
        key = budget_key(text)
        if key not in seen:
            seen.add(key)
            kept.append(normalise(text))
    return kept


def requester_key(text: str | IPAddress, ipv6_prefix: int = 64) -> str:
    """Who the per-requester limits count: an IPv4 address, or the IPv6 network of `ipv6_prefix` bits."""
    address = ipaddress.ip_address(normalise(text))
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
