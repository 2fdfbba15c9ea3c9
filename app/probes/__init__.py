"""The registry of checks: one planner per service. Pure asyncio network code, no web imports.

A planner turns (host, ports, options) into PlannedCheck units. A unit covers one port and promises the names of
the check rows it will emit (a relay port: one row per variant). The audit lifecycle runs the units, gives each
connection a slot under the per-host limit, and fills in a row for any promised name that a unit did not emit
(cut by the deadline, or a bug), so no check is ever silently lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from app.config import Settings
from app.probes import blocklist, proxy, reachability, smtp
from app.probes.base import Emit, SlotFactory
from app.probes.blocklist import AnswerCache, BlocklistOptions, MemoryCache
from app.probes.proxy import CanaryTargets, ProxyOptions
from app.probes.smtp import RelayOptions


@dataclass(frozen=True)
class ProbeOptions:
    """What the probes of one audit need, built once from the settings (`for_audit`)."""

    connect_timeout: float  # for reachability checks
    relay: RelayOptions
    proxy: ProxyOptions | None  # None: no canary configured, proxy ports get reachability only
    blocklist: BlocklistOptions

    @classmethod
    def for_audit(cls, settings: Settings, audit_id: str, audited_domain: str | None = None,
                  canary: CanaryTargets | None = None, cache: AnswerCache | None = None) -> ProbeOptions:
        """`cache`: where the blocklists' answers are kept (the store; without one, this process's memory)."""
        lists = BlocklistOptions(blocklist.load_lists(settings.blocklists_file), tuple(settings.dns_servers),
                                 settings.blocklist_timeout, settings.blocklist_cache_seconds, cache or _MEMORY)
        return cls(connect_timeout=settings.connect_timeout,
                   relay=RelayOptions.from_settings(settings, audit_id, audited_domain),
                   proxy=ProxyOptions.from_settings(settings, canary) if canary is not None else None,
                   blocklist=lists)


_MEMORY = MemoryCache()


@dataclass(frozen=True)
class PlannedCheck:
    service: str
    host: str
    port: int
    names: tuple[str, ...]  # the rows this unit promises
    run: Callable[[Emit, SlotFactory], Awaitable[None]]


class Planner(Protocol):
    def __call__(self, host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]: ...


def _reachability_planner(service: str) -> Planner:
    def plan(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
        def unit(port: int) -> PlannedCheck:
            async def run(emit: Emit, slot: SlotFactory) -> None:
                async with slot():
                    result = await reachability.check(service, host, port, options.connect_timeout)
                await emit(result)
            return PlannedCheck(service, host, port, (f"{service}.{reachability.NAME}",), run)
        return [unit(port) for port in ports]
    return plan


def plan_relay(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
    names = tuple(f"relay.{v.id}" for v in smtp.VARIANTS)

    def unit(port: int) -> PlannedCheck:
        async def run(emit: Emit, slot: SlotFactory) -> None:
            await smtp.run_port(emit, slot, host, port, options.relay)
        return PlannedCheck("relay", host, port, names, run)
    return [unit(port) for port in ports]


def plan_proxy(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
    proxy_options = options.proxy
    if proxy_options is None:
        return _reachability_planner("proxy")(host, ports, options)

    def unit(port: int) -> PlannedCheck:
        checks = proxy.planned_checks(host, port, proxy_options.targets, proxy_options.wingate_ports)

        async def run(emit: Emit, slot: SlotFactory) -> None:
            await proxy.run_port(emit, slot, host, port, proxy_options)
        return PlannedCheck("proxy", host, port, tuple(f"proxy.{c.id}" for c in checks), run)
    return [unit(port) for port in ports]


def plan_blocklist(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
    """One unit per address, promising a row per list; it asks DNS only, so it takes no slot of the address (the
    ports do not matter)."""
    lists = options.blocklist

    async def run(emit: Emit, slot: SlotFactory) -> None:
        await blocklist.run_address(emit, host, lists)
    return [PlannedCheck("blocklist", host, 0, tuple(f"blocklist.{b.id}" for b in lists.lists), run)]


_DESCRIPTIONS = {f"relay.{v.id}": f"{v.mail_from} -> {v.rcpt_to}: {v.explanation}" for v in smtp.VARIANTS}
_DESCRIPTIONS.update({f"proxy.{c.id}": f"{c.protocol}: {c.explanation}" for c in proxy.PROXY_CHECKS})
_DESCRIPTIONS.update({
    "relay.reachable": "Whether the mail port accepts connections.",
    "proxy.reachable": "Whether the proxy port accepts connections.",
})


_PROXY_CLASSES = {f"proxy.{c.id}": c.klass for c in proxy.PROXY_CHECKS}


def proxy_class(name: str) -> str | None:
    """web (pages for anyone), smtp (spam can flow) or tunnel (encrypted traffic to port 443)."""
    return _PROXY_CLASSES.get(name)


def describe_check(name: str) -> str:
    """One line for the visitor: what a check tries (a blocklist row: what the list lists)."""
    if name.startswith("blocklist.") and name not in _DESCRIPTIONS:
        return "Whether a public blocklist names the address."
    return _DESCRIPTIONS.get(name, "")


PLANNERS: dict[str, Planner] = {
    "relay": plan_relay,
    "proxy": plan_proxy,
    "blocklist": plan_blocklist,
}
