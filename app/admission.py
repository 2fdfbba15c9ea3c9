"""Whether a new audit may start: every limit decided at once, from facts read in the same store transaction
that creates the audit (store.admit), so a burst of concurrent requests can never pass a limit together.

The rules, in order: the target's cooldown (the latest audit of the same target that covers the request is
served again; anything else inside the cooldown is refused), the target's hourly budget (every requester, name
and service together), the requester's running and hourly limits, and the site's queue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:  # the store builds Facts inside its transaction, so it imports this module
    from app.store import Audit

HOUR = 3600.0


@dataclass(frozen=True)
class Limits:
    cooldown: float
    audits_per_target_per_hour: int
    max_running_per_requester: int
    audits_per_hour: int
    max_queued: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(cooldown=settings.target_cooldown, audits_per_target_per_hour=settings.audits_per_target_per_hour,
                   max_running_per_requester=settings.max_running_per_requester,
                   audits_per_hour=settings.audits_per_hour, max_queued=settings.max_queued_audits)


@dataclass(frozen=True)
class Facts:
    """What the store knows at the moment of the decision."""

    now: float
    latest: Audit | None  # the newest servable audit of any of the addresses inside the cooldown
    target_hour: Sequence[tuple[str, int, float]]  # per address: audits in the last hour, the oldest one's time
    requester_running: int
    requester_hour: int
    requester_oldest: float | None  # the oldest of the requester's audits in the last hour
    queued: int  # audits waiting for a slot, site-wide


@dataclass(frozen=True)
class Decision:
    outcome: str  # "create", "cached" or "refused"
    code: str = ""  # why refused: cooldown | target_hourly | requester_running | requester_hourly | busy
    retry_after: int | None = None  # seconds
    latest: Audit | None = None  # the cached audit, or the one whose cooldown refused the request
    address: str | None = None  # the address whose budget is spent
    limit: float | None = None


def _wait(until: float, now: float) -> int:
    return max(1, math.ceil(until - now))


def covers(latest: Audit, target: str, hosts: Sequence[str], services: Sequence[str]) -> bool:
    """An audit may be served again for a request of the same target, hosts and (a subset of) services."""
    return (latest.target == target and set(hosts) <= set(latest.hosts)
            and set(services) <= set(latest.services))


def decide(facts: Facts, limits: Limits, *, target: str, hosts: Sequence[str], services: Sequence[str],
           retest: bool) -> Decision:
    now = facts.now
    if facts.latest is not None and limits.cooldown > 0:
        if not retest and covers(facts.latest, target, hosts, services):
            return Decision("cached", latest=facts.latest)
        return Decision("refused", "cooldown", _wait(facts.latest.created_at + limits.cooldown, now),
                        latest=facts.latest, limit=limits.cooldown)
    for address, count, oldest in facts.target_hour:
        if count >= limits.audits_per_target_per_hour:
            return Decision("refused", "target_hourly", _wait(oldest + HOUR, now), address=address,
                            limit=limits.audits_per_target_per_hour)
    if facts.requester_running >= limits.max_running_per_requester:
        return Decision("refused", "requester_running", 30, limit=limits.max_running_per_requester)
    if facts.requester_hour >= limits.audits_per_hour:
        return Decision("refused", "requester_hourly", _wait((facts.requester_oldest or now) + HOUR, now),
                        limit=limits.audits_per_hour)
    if facts.queued >= limits.max_queued:
        return Decision("refused", "busy", 60, limit=limits.max_queued)
    return Decision("create")
