"""Targets and the public-address guard.

Only public unicast addresses are tested, unless SECURE_ALLOW_NETWORKS lists the address (tests, intranets).
A name is resolved once and its addresses pinned for the whole audit (no DNS rebinding between the guard and
the probes). The site never plans a check against its own listeners.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.access.addresses import embedded_ipv4, unique

if TYPE_CHECKING:
    from app.access.resolver import Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# Ranges Python's tables may not flag on every version; named here so the guard does not depend on them.
_EXTRA_FORBIDDEN = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32", "100::/64", "2001:db8::/32", "3fff::/20",
    "fc00::/7", "fec0::/10", "2001:2::/48", "2001:10::/28", "2001:20::/28",
)]


class ForbiddenTarget(Exception):
    """The address may not be tested; the message says why, in plain words."""


def why_not_public(address: IPAddress) -> str | None:
    """None for a public unicast address, else the plain reason it is not one."""
    if address.is_loopback:
        return "it is a loopback address (the computer itself)"
    if address.is_multicast:
        return "it is a multicast address"
    if address.is_link_local:
        return "it is a link-local address (valid only on one local network segment)"
    if address.is_unspecified:
        return "it is the unspecified address"
    if isinstance(address, ipaddress.IPv6Address):
        return _why_not_public_v6(address)
    return _why_not_global(address)


def _why_not_public_v6(address: ipaddress.IPv6Address) -> str | None:
    """The IPv6-only ranges, then: an address that carries an IPv4 address (mapped, compatible, 6to4, Teredo,
    NAT64) is judged by that IPv4 address alone; any other by its own ranges."""
    if address.is_site_local:
        return "it is a site-local IPv6 address"
    if address in _NAT64_LOCAL:
        return "it is a local-use NAT64 address"
    inner = embedded_ipv4(address)
    if inner is None:
        return _why_not_global(address)
    reason = why_not_public(inner)
    if reason:
        return f"it embeds the IPv4 address {inner}, and {reason}"
    return None


def _why_not_global(address: IPAddress) -> str | None:
    """Private and reserved space: Python's tables, and _EXTRA_FORBIDDEN for what they may miss."""
    if address.is_private or not address.is_global or any(address in n for n in _EXTRA_FORBIDDEN
                                                             if n.version == address.version):
        return "it is a private or reserved address, not reachable from the Internet"
    if address.is_reserved:
        return "it is a reserved address"
    return None


def guard(address: IPAddress, allow_networks: Sequence[Network]) -> None:
    """Raise ForbiddenTarget unless the address is public or in an allowed network."""
    if any(address in network for network in allow_networks):
        return
    reason = why_not_public(address)
    if reason:
        raise ForbiddenTarget(
            f"We only test servers on the public Internet. The address {address} cannot be tested because {reason}. "
            "If you are behind a company network or a VPN, run the test from the server itself "
            "or prove a domain you control.")


@dataclass(frozen=True)
class Listener:
    host: str  # an address, or "0.0.0.0" / "::" for every address
    port: int


AddressLike = IPAddress | str


def parse_address(value: AddressLike) -> IPAddress:
    """An address from any form it is written in: plain, `[v6]`, with a zone id (dropped)."""
    if isinstance(value, ipaddress.IPv6Address) and value.scope_id:
        value = str(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text.split("%", 1)[0])


def address_forms(value: AddressLike) -> frozenset[IPAddress]:
    """Every address a connection to `value` may reach: the address without its zone id, and the IPv4
    address an IPv6 form carries (mapped ::ffff:a.b.c.d, compatible, 6to4, Teredo, NAT64)."""
    address = parse_address(value)
    forms: set[IPAddress] = {address}
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            forms.add(inner)
    return frozenset(forms)


def _own_on_every_address(form: IPAddress, site: frozenset[IPAddress]) -> bool:
    """Whether a listener on 0.0.0.0 or :: may answer at `form`: the site's own addresses, and every address that
    is not a public unicast one (loopback, private, link-local, the unspecified address itself...), since any of
    them may be an interface of this machine. Both families: `::` is dual-stack by default, and the site's
    other-family address is still the site."""
    return form in site or why_not_public(form) is not None


def is_own_listener(address: AddressLike, port: int, listeners: Sequence[Listener],
                    site_addresses: Iterable[AddressLike] = ()) -> bool:
    """Whether (address, port) reaches one of the site's own listeners (the app, the sink, the canaries).

    Addresses are compared in every form (see `address_forms`), never as strings. `site_addresses` are the
    site's own addresses (SECURE_PUBLIC_ADDRESSES, the canary address, the machine's interfaces), where a
    listener on 0.0.0.0 or :: answers too.
    """
    forms = address_forms(address)
    site: frozenset[IPAddress] = frozenset().union(*(address_forms(a) for a in site_addresses))
    for listener in listeners:
        if listener.port != port:
            continue
        try:
            bound = address_forms(listener.host)
        except ValueError:
            return True  # a name we did not resolve: stay on the safe side for this port
        if forms & bound:
            return True
        if any(b.is_unspecified for b in bound) and any(_own_on_every_address(f, site) for f in forms):
            return True
    return False


@dataclass(frozen=True)
class Resolved:
    """The addresses of a name, split by the guard; pinned for the whole audit."""

    name: str
    allowed: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (address, why)


def check_address(text: str, allow_networks: Sequence[Network]) -> str | None:
    """None if the address may be tested, else why not."""
    address = ipaddress.ip_address(text)
    if any(address in network for network in allow_networks):
        return None
    return why_not_public(address)


async def resolve_guarded(name: str, resolver: Resolver, allow_networks: Sequence[Network]) -> Resolved:
    allowed: list[str] = []
    refused: list[tuple[str, str]] = []
    for text in unique(await resolver.addresses(name)):  # ::ffff:a.b.c.d is a.b.c.d: one server, tested once
        reason = check_address(text, allow_networks)
        if reason is None:
            allowed.append(text)
        else:
            refused.append((text, reason))
    return Resolved(name, tuple(allowed), tuple(refused))
