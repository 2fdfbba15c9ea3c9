"""Verified domains: normalising a domain, and the two ways to prove control of it.

- DNS: a TXT record at `_secure-your-server.<domain>` holding the token.
- HTTP: `http://<domain>/.well-known/secure-your-server.txt` holding the token. The fetch resolves the domain once,
  checks every address with the guard, connects only to those (pinned), follows at most 3 redirects and only to
  the same host, reads at most 1 KiB of body, and has short timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import idna

from app.access.resolver import ResolveError, Resolver
from app.access.targets import Network, resolve_guarded

DNS_LABEL = "_secure-your-server"
WELL_KNOWN = "/.well-known/secure-your-server.txt"
MAX_BODY = 1024
MAX_HEAD = 8 * 1024
MAX_REDIRECTS = 3
HTTP_TIMEOUT = 5.0
USER_AGENT = "SecureYourServer-verification"


class DomainError(ValueError):
    """Not a domain we can verify; the message says what is wrong."""


def normalise_domain(text: str) -> str:
    """IDNA (UTS 46), lower case, no trailing dot; IP literals, single labels and junk are refused."""
    value = text.strip().rstrip(".")
    if not value or len(value) > 253:
        raise DomainError("Enter a domain name such as example.com.")
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        pass
    else:
        raise DomainError("Enter a domain name, not an IP address: an address is tested from the server itself "
                          "(target \"self\").")
    try:
        ascii_name = idna.encode(value, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise DomainError(f"This is not a valid domain name ({exc}).") from None
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise DomainError("Enter a full domain name with a dot, such as example.com.")
    if not all(re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels):
        raise DomainError("A domain name has only letters, digits and hyphens between its dots.")
    if labels[-1].isdigit():
        raise DomainError("The last part of a domain name cannot be a number.")
    return ascii_name


def new_secret() -> str:
    """128 bits, URL-safe: verification ids and tokens."""
    return secrets.token_urlsafe(16)


def hash_id(verification_id: str) -> str:
    """Verification ids are stored hashed: the database alone does not let anyone act as the holder."""
    return hashlib.sha256(b"verification:" + verification_id.encode()).hexdigest()


def token_value(token: str) -> str:
    return f"secure-your-server-verification={token}"


@dataclass(frozen=True)
class Proof:
    verified: bool
    method: str | None
    detail: str


async def check_dns(domain: str, token: str, resolver: Resolver) -> Proof:
    name = f"{DNS_LABEL}.{domain}"
    try:
        texts = await resolver.txt(name)
    except ResolveError as exc:
        return Proof(False, None, str(exc))
    if any(text.strip() == token_value(token) for text in texts):
        return Proof(True, "dns", f"found the TXT record at {name}")
    if texts:
        return Proof(False, None, f"the TXT record at {name} does not hold the token")
    return Proof(False, None, f"no TXT record at {name} yet (DNS changes can take a while to appear)")


class FetchBudgetSpent(Exception):
    """The hourly budget of fetches to this domain or address is spent."""


async def check_http(domain: str, token: str, resolver: Resolver, allow_networks: Sequence[Network],
                     timeout: float = HTTP_TIMEOUT, may_fetch: Callable[[str], bool] | None = None) -> Proof:
    """`may_fetch(address)` is asked before every connection (each one spends the hourly fetch budget)."""
    try:
        resolved = await resolve_guarded(domain, resolver, allow_networks)
    except ResolveError as exc:
        return Proof(False, None, str(exc))
    if not resolved.allowed:
        why = "; ".join(f"{address}: {reason}" for address, reason in resolved.refused) or "it has no address"
        return Proof(False, None, f"we do not fetch from {domain} ({why})")
    url = f"http://{domain}{WELL_KNOWN}"
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            status, location, body = await _fetch(url, domain, resolved.allowed, timeout, may_fetch)
        except FetchBudgetSpent:
            return Proof(False, None, f"we fetched {WELL_KNOWN} from {domain} (or its address) as often as we allow "
                                      "in one hour; the DNS record is still checked every time")
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            return Proof(False, None, f"could not fetch {url}: {type(exc).__name__}")
        if status in (301, 302, 303, 307, 308) and location:
            target = urljoin(url, location)
            parts = urlsplit(target)
            if (parts.hostname or "").lower().rstrip(".") != domain or parts.scheme not in ("http", "https") \
                    or parts.port not in (None, 80, 443):
                return Proof(False, None, f"{url} redirects to another host or port ({target[:200]}); "
                                          "we follow redirects only on the same host")
            url = target
            continue
        if status != 200:
            return Proof(False, None, f"{url} answered HTTP {status}")
        if token in body.decode("utf-8", "replace").split():
            return Proof(True, "http", f"found the token at {url}")
        return Proof(False, None, f"{url} does not hold the token")
    return Proof(False, None, f"more than {MAX_REDIRECTS} redirects")


async def _fetch(url: str, domain: str, addresses: Sequence[str], timeout: float,
                 may_fetch: Callable[[str], bool] | None = None) -> tuple[int, str, bytes]:
    """GET url from one of the pinned addresses: (status, Location, at most 1 KiB of body).

    The next address is tried when one cannot be reached (connection, TLS or timeout); a reply that is not HTTP
    ends the fetch."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last_error: Exception = OSError("no address")
    for address in addresses:
        if may_fetch is not None and not may_fetch(address):
            raise FetchBudgetSpent(address)
        try:
            async with asyncio.timeout(timeout):
                head, body = await _get(address, domain, path, secure)
            status, location = _parse_head(head)
            return status, location, body[:MAX_BODY]
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            last_error = exc
    raise last_error


async def _get(address: str, domain: str, path: str, secure: bool) -> tuple[bytes, bytes]:
    """One GET of `path` from `address` (port 443 with TLS, else 80): the reply's head and body, both bounded."""
    context = _any_certificate() if secure else None
    reader, writer = await asyncio.open_connection(address, 443 if secure else 80, ssl=context,
                                                   server_hostname=domain if secure else None)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nUser-Agent: {USER_AGENT}\r\n"
                     f"Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii"))
        await writer.drain()
        head, body = await _read_head(reader)
        return head, await _read_body(reader, body)
    finally:
        writer.transport.abort()


def _any_certificate() -> ssl.SSLContext:
    """TLS without checking the certificate: control of the domain is proven by the content, so any will do."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The reply's head up to the blank line (at most MAX_HEAD bytes), and what came after it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await reader.read(MAX_HEAD - len(head))
        if not chunk or len(head) >= MAX_HEAD:
            raise ValueError("no complete HTTP reply head")
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    return head, body


async def _read_body(reader: asyncio.StreamReader, body: bytes) -> bytes:
    """More of the body, until MAX_BODY bytes or the end."""
    while len(body) < MAX_BODY:
        chunk = await reader.read(MAX_BODY - len(body))
        if not chunk:
            break
        body += chunk
    return body


def _parse_head(head: bytes) -> tuple[int, str]:
    """(status, Location) of a reply head; ValueError when it is not HTTP."""
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"^HTTP/\d\.\d (\d{3})", lines[0])
    if not match:
        raise ValueError("not an HTTP reply")
    location = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("location:")), "")
    return int(match.group(1)), location
