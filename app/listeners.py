"""The site's own listeners besides the app: the sink and the canaries. Started and stopped with the app
(SECURE_LISTENERS=embedded), or run by their own process, `secure-your-server listeners` (external: app/
listener_process.py), which shares what it sees through the store: web processes then bind nothing, and wait for
arrivals in the store (StoredArrivals) and read canary observations there (Canary.observed).

Every one of them is added to the list of the site's own listeners, which audits never test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.access.targets import IPAddress, Listener, parse_address
from app.config import Settings, parse_listen
from app.probes.canary import Canary, HttpCanary, Journal, SmtpCanary, self_signed_context
from app.probes.proxy import CanaryTargets
from app.probes.sink import Sink

log = logging.getLogger("secure.listeners")
POLL_INTERVAL = 0.2  # how often a process waiting for arrivals reads the store (external listeners)


class Arrivals(Protocol):
    """Where an audit waits for its relayed messages: the sink itself, or the store the sink's process writes."""

    async def wait_for(self, tags: Iterable[str], timeout: float) -> set[str]: ...


class StoredArrivals:
    """The arrivals a listeners process recorded in the store (kind 'sink'), read every POLL_INTERVAL seconds."""

    def __init__(self, journal: Journal, interval: float = POLL_INTERVAL) -> None:
        self.journal = journal
        self.interval = interval

    async def wait_for(self, tags: Iterable[str], timeout: float) -> set[str]:
        wanted = set(tags)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            arrived = set(await self.journal.observed("sink", wanted)) & wanted
            remaining = deadline - loop.time()
            if arrived == wanted or remaining <= 0:
                return arrived
            await asyncio.sleep(min(self.interval, remaining))


class ListenerConfigError(ValueError):
    pass


@dataclass
class Listeners:
    canary: Canary
    own: list[Listener] = field(default_factory=list)
    addresses: tuple[IPAddress, ...] = ()  # the site's own addresses (site_addresses), never tested
    sink: Sink | None = None  # the sink this process runs (embedded, or the listeners process)
    arrivals: Arrivals | None = None  # where audits wait for relayed messages: the sink, or the store
    targets: CanaryTargets | None = None
    _servers: list[Any] = field(default_factory=list)

    async def stop(self) -> None:
        for server in reversed(self._servers):
            await server.stop()
        self._servers.clear()


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def site_addresses(settings: Settings, extra: tuple[str, ...] = ()) -> tuple[IPAddress, ...]:
    """The site's own addresses, where its listeners on 0.0.0.0 / :: answer: SECURE_PUBLIC_ADDRESSES, the canary
    address, the hosts of the site's URLs when they are IP literals, and `extra` (the machine's interfaces)."""
    found: list[IPAddress] = []
    hosts = [*settings.public_addresses, settings.canary_address,
             *(urlsplit(url).hostname or "" for url in (settings.public_url, settings.ipv4_url, settings.ipv6_url)),
             *extra]
    for host in hosts:
        try:
            address = parse_address(host)
        except ValueError:
            continue  # a name (public_url), or empty
        if address not in found:
            found.append(address)
    return tuple(found)


def _interface_addresses() -> tuple[str, ...]:
    """Best effort: the addresses this machine's name resolves to (no interface listing without psutil)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return ()
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


async def machine_addresses(seconds: float = 2.0) -> tuple[str, ...]:
    try:
        return await asyncio.wait_for(asyncio.to_thread(_interface_addresses), seconds)
    except (TimeoutError, OSError):
        log.warning("listeners.no_interface_addresses")
        return ()


async def start_listeners(settings: Settings, secret: str, app_listeners: list[Listener],
                          journal: Journal | None = None) -> Listeners:
    """Bind the sink and the canaries here. `journal`: where they share what they see (the listeners process)."""
    listeners = Listeners(canary=Canary(secret, journal), own=list(app_listeners),
                          addresses=site_addresses(settings, await machine_addresses()))
    try:
        if settings.sink_listen:
            await _start_sink(listeners, settings.sink_listen, settings.probe_domain)
            listeners.arrivals = listeners.sink
        ports, hosts = await _start_canaries(listeners, settings)
        listeners.targets = _canary_targets(settings, listeners.canary, ports, hosts)
    except BaseException:
        await listeners.stop()
        raise
    log.info("listeners.own", extra={"listeners": [f"{o.host}:{o.port}" for o in listeners.own],
                                     "addresses": [str(a) for a in listeners.addresses]})
    return listeners


async def external_listeners(settings: Settings, secret: str, app_listeners: list[Listener],
                             journal: Journal) -> Listeners:
    """SECURE_LISTENERS=external: another process runs the sink and canaries at the configured addresses (fixed
    ports: this process cannot learn ones chosen at bind time). Nothing is bound here; arrivals and observations
    are read from `journal` (the store)."""
    listeners = Listeners(canary=Canary(secret, journal), own=list(app_listeners),
                          addresses=site_addresses(settings, await machine_addresses()))
    ports: dict[str, int] = {}
    hosts: list[str] = []
    for kind, value in (("sink", settings.sink_listen), ("smtp", settings.canary_smtp_listen),
                        ("http", settings.canary_http_listen), ("tls", settings.canary_tls_listen)):
        if not value:
            continue
        host, port = parse_listen(value)
        if port == 0:
            raise ListenerConfigError(f"SECURE_LISTENERS=external needs a fixed port for every listener ({value})")
        listeners.own.append(Listener(host, port))
        if kind != "sink":
            ports[kind] = port
            hosts.append(host)
    if settings.sink_listen:
        listeners.arrivals = StoredArrivals(journal)
    listeners.targets = _canary_targets(settings, listeners.canary, ports, hosts)
    return listeners


async def _start_sink(listeners: Listeners, listen: str, probe_domain: str) -> None:
    host, port = parse_listen(listen)
    listeners.sink = Sink(probe_domain)
    await listeners.sink.start(host, port)
    listeners._servers.append(listeners.sink)
    listeners.own.append(Listener(host, listeners.sink.port or port))
    log.info("sink.started", extra={"listen": f"{host}:{listeners.sink.port}"})


async def _start_canaries(listeners: Listeners, settings: Settings) -> tuple[dict[str, int], list[str]]:
    """The configured canaries, each added to the site's own listeners: (kind -> port, the hosts they listen on)."""
    ports: dict[str, int] = {}
    hosts: list[str] = []
    for kind, value, server in (
            ("smtp", settings.canary_smtp_listen, SmtpCanary(listeners.canary)),
            ("http", settings.canary_http_listen, HttpCanary(listeners.canary, "http")),
            ("tls", settings.canary_tls_listen, HttpCanary(listeners.canary, "tls"))):
        if not value:
            continue
        host, port = parse_listen(value)
        context = self_signed_context() if kind == "tls" else None
        ports[kind] = await (server.start(host, port, context) if isinstance(server, HttpCanary)
                             else server.start(host, port))
        listeners._servers.append(server)
        listeners.own.append(Listener(host, ports[kind]))
        hosts.append(host)
        log.info("canary.started", extra={"kind": kind, "listen": f"{host}:{ports[kind]}"})
    return ports, hosts


def _canary_targets(settings: Settings, canary: Canary, ports: dict[str, int],
                    hosts: list[str]) -> CanaryTargets | None:
    """What proxies are asked to reach: SECURE_CANARY_ADDRESS, else the first canary host that is one address;
    None when no canary listens and no address is set."""
    address = settings.canary_address or next((h for h in hosts if not _is_unspecified(h)), "")
    if hosts and not address:
        raise ListenerConfigError("a canary listens on every address: set SECURE_CANARY_ADDRESS to the "
                                  "address proxies should reach")
    if not address:
        return None
    return CanaryTargets(canary=canary, address=address, name=settings.canary_name or None,
                         http_base=_canary_http_base(settings, address, ports),
                         smtp_port=ports.get("smtp"), tls_port=ports.get("tls"))


def _canary_http_base(settings: Settings, address: str, ports: dict[str, int]) -> str | None:
    """Where proxies fetch the HTTP canary at `address`: its own listener, or the site itself, which answers
    /canary/<id>, when it is reachable over plain HTTP at that address; else None (no HTTP canary)."""
    shown = f"[{address}]" if ":" in address else address
    if "http" in ports:
        return f"http://{shown}:{ports['http']}"
    public = urlsplit(settings.public_url)
    if public.scheme == "http" and public.hostname == address:
        return f"http://{shown}:{public.port or 80}"
    return None
