"""DNS lookups for the site (dnspython's async resolver), pointed at SECURE_DNS_SERVERS when set.

Every answer is bounded in count; a name that does not exist is an empty answer, a resolver that fails is a
ResolveError with a reason the visitor can act on.
"""

from __future__ import annotations

from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

MAX_ANSWERS = 16


class ResolveError(Exception):
    """The lookup failed (timeout, SERVFAIL); the message says so plainly. `kind`: timeout | failed (the servers
    answered with an error such as SERVFAIL, or refused) | error (anything else)."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def _split_server(value: str) -> tuple[str, int]:
    text = value.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


class Resolver:
    def __init__(self, servers: list[str] | None = None, timeout: float = 5.0) -> None:
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            # one object per server: several servers on one host keep their own ports
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                          for host, port in map(_split_server, servers)]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        """The records of `rdtype` (dnspython types each per class: A/AAAA `.address`, MX `.preference` and
        `.exchange`, TXT `.strings`)."""
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers as exc:
            raise ResolveError(f"the DNS servers for {name} failed to answer ({rdtype})", "failed") from exc
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise ResolveError(f"the DNS lookup of {name} ({rdtype}) timed out", "timeout") from exc
        except dns.exception.DNSException as exc:
            raise ResolveError(f"the DNS lookup of {name} ({rdtype}) failed: {type(exc).__name__}") from exc
        return list(answer)[:MAX_ANSWERS]

    async def records(self, name: str, rdtype: str) -> list[Any]:
        """The records of `rdtype` for `name` ([] when the name or the type does not exist), or ResolveError."""
        return await self._query(name, rdtype)

    async def addresses(self, name: str) -> list[str]:
        """A then AAAA records, in order, without duplicates."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            for record in await self._query(name, rdtype):
                if record.address not in found:
                    found.append(record.address)
        return found

    async def mx(self, name: str) -> list[tuple[int, str]] | None:
        """MX hosts by preference; None when the domain has no MX record; [] for a null MX (RFC 7505)."""
        records = await self._query(name, "MX")
        if not records:
            return None
        hosts = sorted((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records)
        if len(hosts) == 1 and hosts[0][1] in ("", "."):
            return []
        return [(pref, host) for pref, host in hosts if host not in ("", ".")]

    async def txt(self, name: str) -> list[str]:
        texts = []
        for record in await self._query(name, "TXT"):
            texts.append(b"".join(record.strings).decode("utf-8", "replace")[:2048])
        return texts
