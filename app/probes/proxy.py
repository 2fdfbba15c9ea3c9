"""Open-proxy checks: every way a port lets a stranger route traffic, each proven by our canary's token.

A check is `open` only when the per-check token of our own canary comes back through the target; a `200` alone
proves nothing (web servers and captive portals answer anything). HTTP exchanges use our own reader: headers up to
the blank line, the bytes after them kept (the canary's banner often arrives in the same packet). SOCKS handshakes
use python-socks. Every read is bounded (16 KiB a step) and every step has a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from app.config import Settings
from app.probes.base import Emit, Ended, Finding, SlotFactory, check_result, connect_failure
from app.probes.canary import Canary
from app.probes.fingerprint import PROXY_SIGNATURES, identify
from app.probes.tls import tls_context
from app.probes.transcript import Transcript
from app.verdicts import CheckResult, Verdict

MAX_STEP_BYTES = 16 * 1024
# How long a SOCKS greeting or TLS hello waits on a port that already answered HTTP: at least this many seconds,
# or this many times the port's slowest HTTP reply, whichever is longer (never more than the step timeout).
SILENT_PROTOCOL_WAIT = 0.25
SILENT_PROTOCOL_FACTOR = 8
USER_AGENT = "SecureYourServer-proxy-test"

REASONS = ("token_returned", "auth_required", "destination_denied", "answers_without_tunnel", "not_a_proxy",
           "destination_unreachable", "answer_not_returned", "timeout", "refused", "filtered", "protocol_error",
           "internal_error")


@dataclass(frozen=True)
class CanaryTargets:
    """Where proxies are asked to go, and the canary that makes and recognises the tokens."""

    canary: Canary
    address: str  # an IP address proxies can reach
    name: str | None = None  # a DNS name of that address, for SOCKS4a
    http_base: str | None = None  # e.g. http://192.0.2.10:80 (the HTTP canary, or the site itself over http)
    smtp_port: int | None = None
    tls_port: int | None = None

    def hostport(self, port: int) -> str:
        return f"[{self.address}]:{port}" if ":" in self.address else f"{self.address}:{port}"


WINGATE_PORTS = frozenset({23})  # where telnet-style gateways are looked for


@dataclass(frozen=True)
class ProxyOptions:
    targets: CanaryTargets
    connect_timeout: float
    step_timeout: float
    wingate_ports: frozenset[int] = WINGATE_PORTS

    @classmethod
    def from_settings(cls, settings: Settings, targets: CanaryTargets) -> ProxyOptions:
        return cls(targets=targets, connect_timeout=settings.connect_timeout,
                   step_timeout=settings.proxy_step_timeout)


@dataclass
class Exchange:
    """One check's connection: bounded reads with a timeout per step, everything written to the transcript."""

    host: str
    port: int
    options: ProxyOptions
    transcript: Transcript
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    heads: list[dict[str, str]] = field(default_factory=list)  # response headers seen, for the fingerprint
    bodies: list[bytes] = field(default_factory=list)
    received: int = 0  # bytes from the port (not from the canary through a tunnel: those count too, harmlessly)
    head_latency: float = 0.0  # the longest wait for an HTTP reply head: how slow this port answers

    async def open(self, tls: bool = False) -> None:
        self.transcript.info(f"connecting to {self.host} port {self.port}")
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:  # refused, unreachable, silent (TimeoutError)
            failure = connect_failure(exc, self.options.connect_timeout)
            raise Ended(failure.verdict, failure.reason, failure.note) from None
        if tls:
            try:
                async with asyncio.timeout(self.options.step_timeout):
                    await self.writer.start_tls(tls_context())
            except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                reason = "no TLS handshake" if isinstance(exc, TimeoutError) else type(exc).__name__
                raise Ended(Verdict.CLOSED, "not_a_proxy", f"the port does not speak TLS ({reason})") from None
            self.transcript.info("TLS with the port established")

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        for line in data.split(b"\r\n")[:-1] if data.endswith(b"\r\n") else [data]:
            self.transcript.add("out", line)
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.options.step_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise Ended(Verdict.INCONCLUSIVE, "timeout", "the server stopped reading") from None
        except (ConnectionError, OSError) as exc:
            raise Ended(Verdict.CLOSED, "not_a_proxy", f"the server closed the connection ({exc})") from None

    async def read_until(self, done: Callable[[bytes], bool], buffer: bytes = b"", what: str = "a reply",
                         eof_ok: bool = False) -> bytes:
        """Read until `done(buffer)`, end of stream (when eof_ok), 16 KiB or the step timeout."""
        assert self.reader is not None
        try:
            async with asyncio.timeout(self.options.step_timeout):
                while not done(buffer):
                    if len(buffer) >= MAX_STEP_BYTES:
                        raise Ended(Verdict.INCONCLUSIVE, "protocol_error", f"more than 16 KiB without {what}")
                    chunk = await self.reader.read(MAX_STEP_BYTES - len(buffer))
                    if not chunk:
                        if eof_ok:
                            return buffer
                        raise Ended(Verdict.CLOSED, "not_a_proxy", f"the server closed the connection before {what}")
                    self.transcript.add("in", chunk)
                    self.received += len(chunk)
                    buffer += chunk
        except TimeoutError:
            raise Ended(Verdict.INCONCLUSIVE, "timeout",
                          f"no {what} within {self.options.step_timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise Ended(Verdict.CLOSED, "not_a_proxy", f"the connection failed before {what} ({exc})") from None
        return buffer

    async def read_head(self) -> tuple[int, dict[str, str], bytes]:
        """An HTTP response head: (status, headers, the bytes after the blank line). Not HTTP: not_a_proxy."""
        def complete(buffer: bytes) -> bool:
            return b"\r\n\r\n" in buffer or b"\n\n" in buffer or (len(buffer) >= 5 and not buffer.startswith(b"HTTP/"))
        started = asyncio.get_running_loop().time()
        status, headers, rest = parse_head(await self.read_until(complete, what="an HTTP reply"))
        self.head_latency = max(self.head_latency, asyncio.get_running_loop().time() - started)
        self.heads.append(headers)
        return status, headers, rest

    async def close(self) -> None:
        if self.writer is not None:
            # abort: a graceful close can wait on a TLS peer that never answers; we need nothing more from it
            self.writer.transport.abort()
            self.writer = None


def parse_head(buffer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Split an HTTP response at the blank line; keep the bytes after it (the tunnel's first bytes)."""
    if not buffer.startswith(b"HTTP/"):
        raise Ended(Verdict.CLOSED, "not_a_proxy", "the port does not answer HTTP")
    end = buffer.find(b"\r\n\r\n")
    if end >= 0:
        head, rest = buffer[:end], buffer[end + 4:]
    else:
        head, _, rest = buffer.partition(b"\n\n")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    match = re.match(r"^HTTP/\d\.\d\s+(\d{3})\b\s*(.*)$", lines[0])
    if not match:
        raise Ended(Verdict.CLOSED, "not_a_proxy", "a malformed HTTP status line")
    headers: dict[str, str] = {":reason": match.group(2).strip()[:100]}
    for line in lines[1:80]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip()[:300])
    return int(match.group(1)), headers, rest


_ANSWERED = re.compile(r"^[A-Z]+ answered HTTP \d{3}")  # how every note of http_status_finding starts
_UNREACHABLE = re.compile(r"connect|unreachable|resolve|timed? ?out", re.IGNORECASE)


def http_status_finding(status: int, headers: dict[str, str], what: str) -> Finding:
    """A reply that is not the tunnel or page we asked for."""
    note = f"{what} answered HTTP {status}"
    if status == 407:
        return Finding(Verdict.AUTH_REQUIRED, "auth_required", note + ": the proxy asks for a login")
    if status == 403:
        return Finding(Verdict.CLOSED, "destination_denied", note + ": the proxy refused our destination")
    if status in (502, 503, 504) or (status == 500 and _UNREACHABLE.search(headers.get(":reason", ""))):
        # tinyproxy says "500 Unable to connect"; Squid 503 ERR_CONNECT_FAIL
        return Finding(Verdict.INCONCLUSIVE, "destination_unreachable", note + ": the proxy could not reach our canary")
    if 200 <= status < 400:
        return Finding(Verdict.CLOSED, "answers_without_tunnel",
                       note + " but our canary's token did not come back: a web server or portal, not a proxy")
    return Finding(Verdict.CLOSED, "not_a_proxy", note + ": it does not act as a proxy")


# --- the checks --------------------------------------------------------------------------------------------
class ProxyCheckId(StrEnum):
    """The proxy checks' ids (rows proxy.<id>): stable, stored with every audit."""

    HTTP_GET = "http_get"
    CONNECT_SMTP = "connect_smtp"
    CONNECT_TLS = "connect_tls"
    HTTP_POST = "http_post"
    SOCKS4 = "socks4"
    SOCKS4A = "socks4a"
    SOCKS5 = "socks5"
    HTTPS_CONNECT = "https_connect"
    WINGATE = "wingate"


class Opener(StrEnum):
    """What a check sends first. A port that answers HTTP sits silent on a SOCKS greeting or a TLS hello (it waits
    for the end of a request line that never comes), so those checks run after the HTTP ones, with a short wait."""

    HTTP = "HTTP"
    SOCKS = "SOCKS"
    TLS = "TLS"
    GATEWAY = "gateway"  # waits for a telnet-style prompt


Runner = Callable[["Exchange", CanaryTargets, str, str], Awaitable[None]]


@dataclass(frozen=True)
class ProxyCheck:
    id: ProxyCheckId
    protocol: str
    klass: str  # web (pages for anyone), smtp (spam can flow), tunnel (encrypted traffic to port 443)
    explanation: str
    needs: str  # which canary: http, smtp, tls
    opener: Opener
    run: Runner = field(repr=False, compare=False)
    ipv4_only: bool = False  # SOCKS4 has no IPv6
    needs_name: bool = False  # SOCKS4a asks the proxy to resolve our canary's name
    gateway_ports_only: bool = False  # tried only on ProxyOptions.wingate_ports


async def _smtp_through(ex: Exchange, check_id: str, token: str, buffer: bytes = b"") -> None:
    """Through an established tunnel: the SMTP canary's banner, then EHLO <check id>, then its token."""
    buffer = await ex.read_until(lambda b: b"\n" in b, buffer, what="our mail canary's greeting", eof_ok=True)
    if not buffer.startswith(b"220"):
        raise Ended(Verdict.CLOSED, "answers_without_tunnel",
                      "the tunnel did not lead to our mail canary (no SMTP greeting)")
    await ex.send(f"EHLO {check_id}\r\n".encode())
    reply = await ex.read_until(lambda b: token.encode() in b or b.count(b"\n") >= 3, what="our canary's token")
    if token.encode() not in reply:
        raise Ended(Verdict.CLOSED, "answers_without_tunnel", "our mail canary's token did not come back")
    await ex.send(b"QUIT\r\n")


async def http_get(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    assert targets.http_base is not None
    url = f"{targets.http_base}/canary/{check_id}"
    host = targets.http_base.split("://", 1)[1]
    await ex.open()
    await ex.send(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n"
                  .encode())
    status, headers, rest = await ex.read_head()
    body = await ex.read_until(lambda b: token.encode() in b, rest, what="the page", eof_ok=True)
    ex.bodies.append(body)
    if token.encode() not in body:
        raise Ended.of(http_status_finding(status, headers, "GET"))


async def http_post(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    assert targets.smtp_port is not None
    hostport = targets.hostport(targets.smtp_port)
    payload = f"EHLO {check_id}\r\nQUIT\r\n".encode()
    await ex.open()
    await ex.send(f"POST http://{hostport}/ HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: {USER_AGENT}\r\n"
                  f"Content-Type: text/plain\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    data = await ex.read_until(lambda b: token.encode() in b, what="a reply", eof_ok=True)
    if token.encode() in data:
        return
    status, headers, rest = parse_head(data)
    ex.heads.append(headers)
    ex.bodies.append(rest)
    raise Ended.of(http_status_finding(status, headers, "POST"))


async def _connect(ex: Exchange, hostport: str, extra_crlf: bool = True) -> bytes:
    await ex.send(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: {USER_AGENT}\r\n\r\n".encode())
    if extra_crlf:  # the extra line MikroTik's proxy waits for, as a write of its own; other proxies pass it
        await ex.send(b"\r\n")  # into the tunnel, where our mail canary ignores it (a TLS canary would not)
    status, headers, rest = await ex.read_head()
    if status != 200:
        raise Ended.of(http_status_finding(status, headers, "CONNECT"))
    return rest


async def connect_smtp(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    assert targets.smtp_port is not None
    await ex.open()
    rest = await _connect(ex, targets.hostport(targets.smtp_port))
    await _smtp_through(ex, check_id, token, rest)


async def connect_tls(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    assert targets.tls_port is not None and ex.writer is None
    await ex.open()
    rest = await _connect(ex, targets.hostport(targets.tls_port), extra_crlf=False)
    if rest:
        raise Ended(Verdict.CLOSED, "answers_without_tunnel", "bytes came before our TLS handshake: no tunnel")
    assert ex.writer is not None
    try:
        async with asyncio.timeout(ex.options.step_timeout):
            await ex.writer.start_tls(tls_context())
    except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
        raise Ended(Verdict.CLOSED, "answers_without_tunnel",
                      f"no TLS with our canary through the tunnel ({type(exc).__name__})") from None
    ex.transcript.info("TLS with our canary established through the tunnel")
    await ex.send(f"GET /canary/{check_id} HTTP/1.1\r\nHost: {targets.hostport(targets.tls_port)}\r\n"
                  f"Connection: close\r\n\r\n".encode())
    body = await ex.read_until(lambda b: token.encode() in b, what="our canary's page", eof_ok=True)
    if token.encode() not in body:
        raise Ended(Verdict.CLOSED, "answers_without_tunnel", "our TLS canary's token did not come back")


async def https_connect(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    assert targets.smtp_port is not None
    await ex.open(tls=True)
    rest = await _connect(ex, targets.hostport(targets.smtp_port))
    await _smtp_through(ex, check_id, token, rest)


def _socks_runner(kind: str) -> Runner:
    async def run(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
        assert targets.smtp_port is not None
        proxy_type = ProxyType.SOCKS5 if kind == "socks5" else ProxyType.SOCKS4
        destination = targets.name if kind == "socks4a" and targets.name else targets.address
        rdns = kind == "socks4a" or None
        ex.transcript.info(f"connecting to {ex.host} port {ex.port}")
        ex.transcript.add("out", f"{kind.upper()} CONNECT {destination} port {targets.smtp_port}"
                          + (" (no authentication offered)" if kind == "socks5" else ""))
        proxy = Proxy(proxy_type, ex.host, ex.port, rdns=rdns)
        try:
            # the port already accepted a connection (the gate): the handshake gets one step's time
            sock = await proxy.connect(destination, targets.smtp_port, timeout=ex.options.step_timeout)
        except ProxyTimeoutError:
            raise Ended(Verdict.INCONCLUSIVE, "timeout", f"the {kind.upper()} handshake did not finish") from None
        except ProxyConnectionError as exc:
            raise Ended.of(connect_failure(exc, ex.options.connect_timeout)) from None
        except ProxyError as exc:
            raise Ended.of(socks_finding(kind, exc)) from None
        except OSError as exc:  # a reset or a broken pipe in the middle of the handshake: it is not SOCKS to us
            raise Ended(Verdict.CLOSED, "not_a_proxy",
                        f"the connection failed during the {kind.upper()} handshake ({exc})") from None
        ex.transcript.add("in", f"{kind.upper()}: request granted")
        reader, writer = await asyncio.open_connection(sock=sock)
        ex.attach(reader, writer)
        await _smtp_through(ex, check_id, token)
    return run


SOCKS5_REPLIES = {1: "general failure", 2: "connection not allowed by ruleset", 3: "network unreachable",
                  4: "host unreachable", 5: "connection refused", 6: "TTL expired", 7: "command not supported",
                  8: "address type not supported"}


def socks_finding(kind: str, exc: ProxyError) -> Finding:
    code, text = exc.error_code, str(exc)
    name = kind.upper()
    if kind == "socks5" and isinstance(code, int):
        note = f"{name} reply {code:#04x} ({SOCKS5_REPLIES.get(code, 'unknown')})"
        if code == 2:
            return Finding(Verdict.CLOSED, "destination_denied", note)
        return Finding(Verdict.INCONCLUSIVE, "destination_unreachable", note)
    if kind != "socks5" and isinstance(code, int):
        note = f"{name} reply {code:#04x}"
        if code in (0x5C, 0x5D):
            return Finding(Verdict.AUTH_REQUIRED, "auth_required", note + " (identd check failed)")
        return Finding(Verdict.INCONCLUSIVE, "destination_unreachable", note + " (rejected or failed)")
    if "No acceptable authentication methods" in text or "Unexpected SOCKS authentication method" in text:
        return Finding(Verdict.AUTH_REQUIRED, "auth_required", f"{name}: the proxy asks for a login")
    return Finding(Verdict.CLOSED, "not_a_proxy", f"the port does not speak {name} ({text[:120]})")


async def wingate(ex: Exchange, targets: CanaryTargets, check_id: str, token: str) -> None:
    """A telnet-style gateway: a prompt that takes `host:port` and connects us there."""
    assert targets.smtp_port is not None
    await ex.open()
    def prompted(buffer: bytes) -> bool:
        return (buffer.rstrip().endswith(b">") or b":" in buffer.rsplit(b"\n", 1)[-1]
                or (buffer[:3].isdigit() and b"\n" in buffer))  # a numbered reply: some other protocol
    prompt = await ex.read_until(prompted, what="a gateway prompt")
    ex.bodies.append(prompt)
    if prompt[:3].isdigit():
        raise Ended(Verdict.CLOSED, "not_a_proxy", "the port answers with a numbered reply, not a gateway prompt")
    await ex.send(f"{targets.address}:{targets.smtp_port}\r\n".encode())
    data = await ex.read_until(lambda b: b"\n220" in b or (b.startswith(b"220") and b"\n" in b),
                               what="our mail canary's greeting")
    await _smtp_through(ex, check_id, token, data[data.find(b"220"):])


PROXY_CHECKS: tuple[ProxyCheck, ...] = (
    ProxyCheck(ProxyCheckId.HTTP_GET, "HTTP GET", "web", "Asks the port to fetch our test page, as a web proxy would.",
               "http", Opener.HTTP, http_get),
    ProxyCheck(ProxyCheckId.CONNECT_SMTP, "HTTP CONNECT", "smtp",
               "Asks for a tunnel to our mail test server: through this, spam can flow.", "smtp", Opener.HTTP,
               connect_smtp),
    ProxyCheck(ProxyCheckId.CONNECT_TLS, "HTTP CONNECT", "tunnel",
               "Asks for a tunnel to our encrypted web test server (the port-443 case).", "tls", Opener.HTTP,
               connect_tls),
    ProxyCheck(ProxyCheckId.HTTP_POST, "HTTP POST", "smtp",
               "Posts mail commands to our mail test server through the proxy.", "smtp", Opener.HTTP, http_post),
    ProxyCheck(ProxyCheckId.SOCKS4, "SOCKS4", "smtp", "Asks for a SOCKS4 connection to our mail test server.", "smtp",
               Opener.SOCKS, _socks_runner("socks4"), ipv4_only=True),
    ProxyCheck(ProxyCheckId.SOCKS4A, "SOCKS4a", "smtp",
               "Asks for a SOCKS4a connection to our mail test server by name.", "smtp", Opener.SOCKS,
               _socks_runner("socks4a"), ipv4_only=True, needs_name=True),
    ProxyCheck(ProxyCheckId.SOCKS5, "SOCKS5", "smtp",
               "Asks for a SOCKS5 connection (no login offered) to our mail test server.", "smtp", Opener.SOCKS,
               _socks_runner("socks5")),
    ProxyCheck(ProxyCheckId.HTTPS_CONNECT, "HTTPS proxy", "smtp",
               "Speaks TLS to the port, then asks for a tunnel to our mail test server.", "smtp", Opener.TLS,
               https_connect),
    ProxyCheck(ProxyCheckId.WINGATE, "WinGate-style gateway", "smtp",
               "Types our mail test server's address at a telnet-style gateway prompt.", "smtp", Opener.GATEWAY,
               wingate, gateway_ports_only=True),
)


def planned_checks(host: str, port: int, targets: CanaryTargets,
                   wingate_ports: frozenset[int] = WINGATE_PORTS) -> list[ProxyCheck]:
    """Which checks apply to this port: the canary they need exists, the address family allows them."""
    ipv6 = ipaddress.ip_address(host).version == 6
    have = {"http": targets.http_base is not None, "smtp": targets.smtp_port is not None,
            "tls": targets.tls_port is not None}
    return [check for check in PROXY_CHECKS
            if have[check.needs] and not (check.ipv4_only and ipv6) and not (check.needs_name and not targets.name)
            and not (check.gateway_ports_only and port not in wingate_ports)]


# --- one port ----------------------------------------------------------------------------------------------
# what a SOCKS port answers when it speaks SOCKS, whatever it thinks of our request
_SOCKS_ANSWERS = ("token_returned", "auth_required", "destination_denied", "destination_unreachable")


@dataclass
class _Ran:
    """One check's end, with the exchange that shows how the port behaved."""

    check: ProxyCheck
    finding: Finding
    ex: Exchange

    @property
    def speaks(self) -> Opener | None:
        """Which protocol the port answered this check in, if it answered at all."""
        if self.check.opener is Opener.SOCKS:
            return Opener.SOCKS if self.finding.reason in _SOCKS_ANSWERS else None
        if self.ex.heads or (self.finding.reason == "token_returned" and self.check.opener is not Opener.GATEWAY):
            return Opener.HTTP
        return None


async def run_port(emit: Emit, slot: SlotFactory, host: str, port: int, options: ProxyOptions) -> None:
    """A reachability gate first (a closed port costs one connection), then every check; rows carry the port's
    fingerprint, so they are emitted together when the port is done."""
    checks = planned_checks(host, port, options.targets, options.wingate_ports)
    gate = Exchange(host, port, options, Transcript())
    try:
        async with slot():
            await gate.open()
            await gate.close()
    except Ended as refused:
        for check in checks:
            await emit(check_result("proxy", host, port, check.id, refused.finding, gate.transcript.fork()))
        return
    first = [c for c in checks if c.opener in (Opener.HTTP, Opener.GATEWAY)]
    ran = await asyncio.gather(*(_run_check(check, slot, host, port, options) for check in first))
    later_options = _paced(options, [r for r in ran if r.speaks is Opener.HTTP])
    ran += await asyncio.gather(*(_run_check(check, slot, host, port, later_options)
                                  for check in checks if check not in first))
    ran = _silence_is_not_a_timeout(sorted(ran, key=lambda r: checks.index(r.check)))
    fingerprint = port_fingerprint(ran)
    for r in ran:
        await emit(_row(r, host, port, fingerprint))


def _row(ran: _Ran, host: str, port: int, fingerprint: dict[str, str | None] | None) -> CheckResult:
    """A proxy check is confirmed when it is open: the token that came back is the proof."""
    return check_result("proxy", host, port, ran.check.id, ran.finding, ran.ex.transcript, fingerprint=fingerprint,
                        confirmed=ran.finding.verdict is Verdict.OPEN)


def _paced(options: ProxyOptions, answered: list[_Ran]) -> ProxyOptions:
    """A real SOCKS or TLS peer answers within a few round trips; a port that answered HTTP showed us its pace."""
    if not answered:
        return options
    latency = max(r.ex.head_latency for r in answered)
    return replace(options, step_timeout=min(options.step_timeout,
                                             max(SILENT_PROTOCOL_WAIT, SILENT_PROTOCOL_FACTOR * latency)))


async def _run_check(check: ProxyCheck, slot: SlotFactory, host: str, port: int, options: ProxyOptions) -> _Ran:
    check_id = options.targets.canary.new_check_id()
    token = options.targets.canary.token(check_id)
    ex = Exchange(host, port, options, Transcript())
    ex.transcript.info(f"{check.protocol}: {check.explanation}")
    async with slot():
        try:
            await check.run(ex, options.targets, check_id, token)
            finding = _token_returned(check, host, await options.targets.canary.observed(check_id))
        except Ended as ended:
            finding = _reached_but_not_returned(ended.finding, await options.targets.canary.observed(check_id))
        except Exception as exc:  # noqa: BLE001 - a bug of ours, or something python-socks did not expect: never a crash
            finding = Finding(Verdict.ERROR, "internal_error", f"the check failed: {type(exc).__name__}: {exc}"[:200])
        finally:
            await ex.close()
    return _Ran(check, finding, ex)


def _token_returned(check: ProxyCheck, host: str, sources: list[str]) -> Finding:
    where = (f"; our canary saw it arrive from {', '.join(sources)}"
             + (" (your server's address)" if host in sources else "")) if sources else ""
    return Finding(Verdict.OPEN, "token_returned",
                   f"{check.protocol} ({check.klass}): our canary's token came back through this port" + where)


def _reached_but_not_returned(finding: Finding, sources: list[str]) -> Finding:
    """A check that ended without its token although our canary saw it arrive: whatever the port said (Privoxy's
    `502` for a POST whose answer is not HTTP, a timeout, a mangled tunnel), it did reach our canary. Not `open`,
    since the token did not come back; not "could not reach" or "not a proxy" either."""
    if not sources or finding.verdict is Verdict.OPEN:
        return finding
    answered = _ANSWERED.match(finding.note)  # the fact, without our reading of the status ("could not reach")
    return Finding(Verdict.INCONCLUSIVE, "answer_not_returned",
                   f"our canary saw this check arrive from {', '.join(sources)}: the port passed our request on, but "
                   f"our canary's answer did not come back through it ({answered[0] if answered else finding.note})")


def _silence_is_not_a_timeout(ran: list[_Ran]) -> list[_Ran]:
    """A port that answers one protocol and stays silent to another does not speak the other: an HTTP proxy
    waits for the end of a request line that a SOCKS greeting never sends. That silence is `not_a_proxy` for
    the silent protocol, not an inconclusive timeout."""
    spoken = {r.speaks for r in ran if r.speaks}
    if not spoken:
        return ran
    for r in ran:
        if r.finding.reason == "timeout" and r.ex.received == 0 and r.speaks is None:
            note = f"no answer to {r.check.protocol}, while the port answers {' and '.join(sorted(spoken))}"
            r.ex.transcript.info(f"reclassified: {note}")
            r.finding = Finding(Verdict.CLOSED, "not_a_proxy", note)
    return ran


def port_fingerprint(ran: list[_Ran]) -> dict[str, str | None] | None:
    parts = []
    for r in ran:
        for headers in r.ex.heads:
            for name in ("server", "via", "proxy-agent", "x-squid-error", "x-cache", ":reason"):
                if name in headers:
                    parts.append(f"{name}: {headers[name]}")
        for body in r.ex.bodies:
            parts.append(body[:2000].decode("latin-1"))
    socks = [r.check.protocol for r in ran if r.check.opener is Opener.SOCKS and r.finding.reason in _SOCKS_ANSWERS]
    if socks:
        parts.append("SOCKS: " + ", ".join(socks))
    return identify("\n".join(dict.fromkeys(parts)), PROXY_SIGNATURES)
