"""The registry of checks: one planner per service. Pure asyncio network code, no web imports.

A planner turns (host, ports, options) into PlannedCheck objects; the audit lifecycle runs them. Later issues
replace the reachability planners with the relay and proxy checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from app.probes import reachability
from app.verdicts import CheckResult


@dataclass(frozen=True)
class ProbeOptions:
    """What probes need to know, taken from the settings by the caller."""

    connect_timeout: float = 10.0


@dataclass(frozen=True)
class PlannedCheck:
    service: str
    host: str
    port: int
    name: str
    run: Callable[[], Awaitable[CheckResult]]
    connections: int = 1  # how many connections to the host it holds at once (for the per-host limit)


class Planner(Protocol):
    def __call__(self, host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]: ...


def _reachability_planner(service: str) -> Planner:
    def plan(host: str, ports: list[int], options: ProbeOptions) -> list[PlannedCheck]:
        return [
            PlannedCheck(
                service=service, host=host, port=port, name=f"{service}.{reachability.NAME}",
                run=lambda port=port: reachability.check(service, host, port, options.connect_timeout),
            )
            for port in ports
        ]
    return plan


PLANNERS: dict[str, Planner] = {
    "relay": _reachability_planner("relay"),
    "proxy": _reachability_planner("proxy"),
}
