"""The site's own listeners besides the app: the sink and the canaries. Started and stopped with the app.

Every one of them is added to the list of the site's own listeners, which audits never test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.access.targets import IPAddress, Listener, parse_address
from app.config import Settings, parse_listen
from app.probes.canary import Canary, HttpCanary, SmtpCanary, self_signed_context
from app.probes.proxy import CanaryTargets
from app.probes.sink import Sink

log = logging.getLogger("secure.listeners")


class ListenerConfigError(ValueError):
    pass


@dataclass
class Listeners:
    canary: Canary
    own: list[Listener] = field(default_factory=list)
    addresses: tuple[IPAddress, ...] = ()  # the site's own addresses (site_addresses), never tested
    sink: Sink | None = None
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


async def start_listeners(settings: Settings, secret: str, app_listeners: list[Listener]) -> Listeners:
    listeners = Listeners(canary=Canary(secret), own=list(app_listeners),
                          addresses=site_addresses(settings, await machine_addresses()))
    try:
        if settings.sink_listen:
            await _start_sink(listeners, settings.sink_listen, settings.probe_domain)
        ports, hosts = await _start_canaries(listeners, settings)
        listeners.targets = _canary_targets(settings, listeners.canary, ports, hosts)
    except BaseException:
        await listeners.stop()
        raise
    log.info("listeners.own", extra={"listeners": [f"{o.host}:{o.port}" for o in listeners.own],
                                     "addresses": [str(a) for a in listeners.addresses]})
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
