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

from app.probes import proxy, reachability, smtp
from app.probes.base import Emit, SlotFactory


@dataclass(frozen=True)
class ProbeOptions:
    """What probes need for one audit, taken from the settings by the caller."""

    audit_id: str = ""
    site_url: str = ""
    probe_domain: str = "probe.invalid"
    probe_helo: str = "probe.invalid"
    connect_timeout: float = 10.0
    smtp_command_timeout: float = 30.0
    smtp_port_deadline: float = 180.0
    greylist_max_wait: float = 0.0
    proxy_step_timeout: float = 10.0
    audited_domain: str | None = None
    canary: proxy.CanaryTargets | None = None  # None: no canary configured, proxies get reachability only


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
    relay_options = smtp.RelayOptions(
        audit_id=options.audit_id, site_url=options.site_url, probe_domain=options.probe_domain,
        probe_helo=options.probe_helo, connect_timeout=options.connect_timeout,
        command_timeout=options.smtp_command_timeout, port_deadline=options.smtp_port_deadline,
        greylist_max_wait=options.greylist_max_wait, audited_domain=options.audited_domain)
    names = tuple(f"relay.{v}" for v in smtp.VARIANT_IDS)

    def unit(port: int) -> PlannedCheck:
        async def run(emit: Emit, slot: SlotFactory) -> None:
            await smtp.run_port(emit, slot, host, port, relay_options)
        return PlannedCheck("relay", host, port, names, run)
    return [unit(port) for port in ports]


def plan_proxy(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
    if options.canary is None:
        return _reachability_planner("proxy")(host, ports, options)
    proxy_options = proxy.ProxyOptions(targets=options.canary, connect_timeout=options.connect_timeout,
                                       step_timeout=options.proxy_step_timeout)

    def unit(port: int) -> PlannedCheck:
        names = tuple(f"proxy.{c.id}" for c in proxy.planned_checks(host, port, proxy_options.targets,
                                                                    proxy_options.wingate_ports))

        async def run(emit: Emit, slot: SlotFactory) -> None:
            await proxy.run_port(emit, slot, host, port, proxy_options)
        return PlannedCheck("proxy", host, port, names, run)
    return [unit(port) for port in ports]


_DESCRIPTIONS = {f"relay.{v.id}": f"{v.mail_from} -> {v.rcpt_to}: {v.explanation}" for v in smtp.VARIANTS}
_DESCRIPTIONS.update({f"proxy.{c.id}": f"{c.protocol}: {c.explanation}" for c, _run in proxy.PROXY_CHECKS})
_DESCRIPTIONS.update({
    "relay.reachable": "Whether the mail port accepts connections.",
    "proxy.reachable": "Whether the proxy port accepts connections.",
})


_PROXY_CLASSES = {f"proxy.{c.id}": c.klass for c, _run in proxy.PROXY_CHECKS}


def proxy_class(name: str) -> str | None:
    """web (pages for anyone), smtp (spam can flow) or tunnel (encrypted traffic to port 443)."""
    return _PROXY_CLASSES.get(name)


def describe_check(name: str) -> str:
    """One line for the visitor: what a check tries."""
    return _DESCRIPTIONS.get(name, "")


PLANNERS: dict[str, Planner] = {
    "relay": plan_relay,
    "proxy": plan_proxy,
}
