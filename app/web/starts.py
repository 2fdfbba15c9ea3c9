"""Who may start what: the plan of an audit request (own address or verified domain), then the limits.

Shared by the API and the HTML forms. Order of refusals: bad input (422) and not yours (403) first; then every
limit at once, in the store transaction that creates the audit (app.admission): inside the target's cooldown the
latest audit of the same target is served again (200), anything else is refused with 429 and Retry-After.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Annotated

from fastapi import Depends, HTTPException

from app.access.addresses import budget_key, normalise, unique
from app.access.domains import hash_id
from app.access.resolver import ResolveError, Resolver
from app.access.targets import ForbiddenTarget, guard, resolve_guarded
from app.admission import Decision, Limits, decide
from app.audits import Auditor, Forbidden
from app.config import Settings
from app.store import Audit, Store
from app.verdicts import SERVICES
from app.web.common import load_audit
from app.web.deps import AuditorDep, Requester, RequesterDep, SettingsDep, StoreDep


@dataclass
class Plan:
    target: str  # "self" or the domain
    requester: str
    requester_key: str
    services: list[str]
    hosts: dict[str, list[str]]
    forbidden: list[Forbidden] = field(default_factory=list)
    verification_hash: str | None = None
    audited_domain: str | None = None

    @property
    def tested(self) -> list[str]:
        return list(dict.fromkeys(a for s in self.services for a in self.hosts.get(s, ())))


@dataclass
class Started:
    audit: Audit
    cached: bool = False  # the latest audit of this target, served again inside the cooldown
    retest_after: float | None = None


def _order(services: Sequence[str]) -> list[str]:
    return [s for s in SERVICES if s in services]


async def verified_domain(store: Store, domain: str, verification_id: str | None) -> str:
    """The hash of a verification that proves control of `domain` now, or 403 saying what is missing."""
    if not verification_id:
        raise HTTPException(403, f"We test {domain} only after you prove that you control it: start a "
                                 "verification (POST /api/v1/verifications) and pass its id as \"verification\".")
    id_hash = hash_id(verification_id)
    record = await store.get_verification(id_hash)
    if record is None or record["domain"] != domain:
        raise HTTPException(403, f"This verification does not belong to {domain}.")
    if float(record["expires_at"]) < time.time():  # type: ignore[arg-type]
        raise HTTPException(403, f"The verification of {domain} has expired; verify the domain again.")
    if not record["verified_at"]:
        raise HTTPException(403, f"{domain} is not verified yet: create the DNS record or the file, then check "
                                 "the verification.")
    return id_hash


def resolver_for(settings: Settings) -> Resolver:
    return Resolver(settings.dns_servers or None)


async def resolve_domain(settings: Settings, domain: str,
                         ordered: Sequence[str]) -> tuple[dict[str, list[str]], list[Forbidden]]:
    """The guarded addresses of each service (relay: the MX hosts'; proxy: the domain's), and a row for each
    address the guard refused; 503 when DNS fails, 403 when nothing is left to test."""
    resolver = resolver_for(settings)
    candidates: dict[str, list[str]] = {}
    forbidden: list[Forbidden] = []
    try:
        for service in ordered:
            if service in ("relay", "blocklist"):
                mx = await resolver.mx(domain)
                # no MX: the domain's own address (RFC 5321 section 5.1); a null MX: no mail at all
                names = [domain] if mx is None else [host for _pref, host in mx]
                # blocklists: the mail servers and the domain's own addresses (where its web and proxy answer)
                names += [domain] if service == "blocklist" and domain not in names else []
            else:
                names = [domain]
            addresses: list[str] = []
            refused: dict[str, str] = {}
            for name in names[:10]:  # by MX preference; each address tested on its own (IPv4 and IPv6)
                resolved = await resolve_guarded(name, resolver, settings.allowed_networks)
                addresses.extend(resolved.allowed)
                for address, why in resolved.refused:
                    refused.setdefault(normalise(address), f"{name} resolves to {address}, and {why}")
            candidates[service] = unique(addresses)
            forbidden.extend(Forbidden(service, address, why) for address, why in refused.items())
    except ResolveError as exc:
        raise HTTPException(503, f"We could not look up {domain}: {exc}. Try again in a minute.",
                            headers={"Retry-After": "60"}) from None
    if not any(candidates.values()):
        why = "; ".join(f.why for f in forbidden) or f"{domain} has no address for the requested checks"
        raise HTTPException(403, f"Nothing of {domain} can be tested: {why}.")
    return candidates, forbidden


def cap_hosts(candidates: dict[str, list[str]], cap: int) -> tuple[dict[str, list[str]], list[Forbidden]]:
    """At most `cap` servers per audit, the services taking turns in their own order (MX preference first);
    every address left out gets a `host_limit` row, never silently dropped."""
    chosen: list[str] = []  # budget keys
    queues = {service: list(addresses) for service, addresses in candidates.items()}
    while len(chosen) < cap and any(queues.values()):
        for queue in queues.values():
            while queue and budget_key(queue[0]) in chosen:
                queue.pop(0)  # already chosen for another service: it costs nothing more
            if queue and len(chosen) < cap:
                chosen.append(budget_key(queue.pop(0)))
    hosts = {s: [a for a in addresses if budget_key(a) in chosen] for s, addresses in candidates.items()}
    why = (f"this audit tests at most {cap} addresses, chosen by MX preference; test this server from itself "
           "(target \"self\") to cover it")
    skipped = [Forbidden(s, a, why, "host_limit") for s, addresses in candidates.items() for a in addresses
               if budget_key(a) not in chosen]
    return hosts, skipped


async def in_cooldown(settings: Settings, store: Store, audit: Audit) -> Audit | None:
    """The latest servable audit of any of the audit's addresses, when it is younger than SECURE_TARGET_COOLDOWN
    (None when the cooldown is off)."""
    cooldown = settings.target_cooldown
    if cooldown <= 0:
        return None
    return await store.latest_covering(audit.id, time.time() - cooldown)


def refusal(decision: Decision) -> HTTPException:
    """A refused admission as the visitor reads it, with Retry-After."""
    wait = decision.retry_after or 60
    minutes = wait // 60 + 1
    messages = {
        "cooldown": f"This server was tested less than {decision.limit or 0:g} seconds ago. You can re-test in "
                    f"{wait} seconds.",
        "target_hourly": f"The address {decision.address} has been tested {decision.limit} times in the last hour, "
                         f"the most we allow for one server whoever asks. Try again in {minutes} minutes.",
        "requester_running": "You already have the most tests running at once that we allow; wait for one to "
                             "finish, then try again.",
        "requester_hourly": f"You have started {decision.limit} tests in the last hour, the most we allow from one "
                            f"address. Try again in {minutes} minutes.",
        "busy": "The site is busy with other tests right now. Try again in a minute.",
    }
    status = 503 if decision.code == "busy" else 429
    return HTTPException(status, messages[decision.code], headers={"Retry-After": str(wait)})


@dataclass
class Starter:
    """Plans and admits the audits one request asks for, from the API or a form."""

    settings: Settings
    store: Store
    auditor: Auditor
    requester: Requester

    def plan_self(self, services: Sequence[str]) -> Plan:
        address = self.requester.address
        try:
            guard(ip_address(address), self.settings.allowed_networks)
        except ForbiddenTarget as exc:
            raise HTTPException(403, str(exc)) from None
        ordered = _order(services)
        address = normalise(address)
        return Plan("self", address, self.requester.key, ordered, {s: [address] for s in ordered})

    async def plan_domain(self, domain: str, verification_id: str | None, services: Sequence[str]) -> Plan:
        id_hash = await verified_domain(self.store, domain, verification_id)
        ordered = _order(services)
        candidates, forbidden = await resolve_domain(self.settings, domain, ordered)
        hosts, skipped = cap_hosts(candidates, self.settings.max_hosts_per_audit)
        return Plan(domain, self.requester.address, self.requester.key, ordered, hosts, [*forbidden, *skipped],
                    id_hash, domain)

    async def begin(self, plan: Plan, previous_id: str | None = None) -> Started:
        judge = functools.partial(decide, limits=Limits.from_settings(self.settings), target=plan.target,
                                  hosts=plan.tested, services=plan.services, retest=previous_id is not None)
        decision, audit = await self.auditor.admit(
            target=plan.target, requester=plan.requester, requester_key=plan.requester_key, hosts=plan.hosts,
            services=plan.services, decide=judge, previous_id=previous_id, verification_id=plan.verification_hash,
            audited_domain=plan.audited_domain, forbidden=plan.forbidden)
        if decision.outcome == "cached" and decision.latest is not None:
            latest = decision.latest
            return Started(latest, cached=True, retest_after=latest.created_at + self.settings.target_cooldown)
        if audit is None:
            raise refusal(decision)
        return Started(audit)

    async def retest(self, audit_id: str, verification_id: str | None = None) -> Started:
        """A new audit of the same target, linked to the previous one; only its requester or verification holder."""
        previous = await load_audit(self.store, audit_id)
        if not previous.finished:
            raise HTTPException(409, "This test is still running; re-test when it has finished.")
        if previous.target == "self":
            plan = self.plan_self(previous.services)
            if plan.requester != previous.requester:
                raise HTTPException(403, "A re-test must come from the same address as the test it repeats "
                                         f"({previous.requester}); you are visiting from {plan.requester}.")
        else:
            if not verification_id or hash_id(verification_id) != previous.verification_id:
                raise HTTPException(403, "Only the holder of the domain's verification can re-test it: pass its "
                                         "id as \"verification\".")
            plan = await self.plan_domain(previous.target, verification_id, previous.services)
        return await self.begin(plan, previous_id=previous.id)


async def get_starter(settings: SettingsDep, store: StoreDep, auditor: AuditorDep, requester: RequesterDep) -> Starter:
    return Starter(settings, store, auditor, requester)


StarterDep = Annotated[Starter, Depends(get_starter)]
