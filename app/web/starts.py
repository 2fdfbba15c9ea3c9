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

from fastapi import HTTPException, Request

from app.access.addresses import budget_key, normalise, requester_key, unique
from app.access.domains import hash_id
from app.access.resolver import ResolveError, Resolver
from app.access.targets import ForbiddenTarget, guard, resolve_guarded
from app.admission import Decision, Limits, decide
from app.audits import Forbidden
from app.store import Audit
from app.verdicts import SERVICES
from app.web.common import load_audit, requester, state


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


def the_requester_key(request: Request) -> str:
    """Who the per-requester limits count: the address, or its IPv6 network (SECURE_IPV6_REQUESTER_PREFIX)."""
    return requester_key(requester(request), state(request).settings.ipv6_requester_prefix)


def _order(services: Sequence[str]) -> list[str]:
    return [s for s in SERVICES if s in services]


def plan_self(request: Request, services: Sequence[str]) -> Plan:
    address = requester(request)
    try:
        guard(ip_address(address), state(request).settings.allowed_networks)
    except ForbiddenTarget as exc:
        raise HTTPException(403, str(exc)) from None
    ordered = _order(services)
    address = normalise(address)
    return Plan("self", address, the_requester_key(request), ordered, {s: [address] for s in ordered})


async def verified_domain(request: Request, domain: str, verification_id: str | None) -> str:
    """The hash of a verification that proves control of `domain` now, or 403 saying what is missing."""
    if not verification_id:
        raise HTTPException(403, f"We test {domain} only after you prove that you control it: start a "
                                 "verification (POST /api/v1/verifications) and pass its id as \"verification\".")
    id_hash = hash_id(verification_id)
    record = await state(request).store.get_verification(id_hash)
    if record is None or record["domain"] != domain:
        raise HTTPException(403, f"This verification does not belong to {domain}.")
    if float(record["expires_at"]) < time.time():  # type: ignore[arg-type]
        raise HTTPException(403, f"The verification of {domain} has expired; verify the domain again.")
    if not record["verified_at"]:
        raise HTTPException(403, f"{domain} is not verified yet: create the DNS record or the file, then check "
                                 "the verification.")
    return id_hash


def resolver_for(request: Request) -> Resolver:
    settings = state(request).settings
    return Resolver(settings.dns_servers or None)


async def plan_domain(request: Request, domain: str, verification_id: str | None, services: Sequence[str]) -> Plan:
    id_hash = await verified_domain(request, domain, verification_id)
    settings = state(request).settings
    resolver = resolver_for(request)
    ordered = _order(services)
    candidates: dict[str, list[str]] = {}
    forbidden: list[Forbidden] = []
    try:
        for service in ordered:
            if service == "relay":
                mx = await resolver.mx(domain)
                # no MX: the domain's own address (RFC 5321 section 5.1); a null MX: no mail at all
                names = [domain] if mx is None else [host for _pref, host in mx]
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
    hosts, skipped = cap_hosts(candidates, settings.max_hosts_per_audit)
    forbidden.extend(skipped)
    return Plan(domain, requester(request), the_requester_key(request), ordered, hosts, forbidden, id_hash, domain)


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


async def in_cooldown(request: Request, audit: Audit) -> Audit | None:
    """The latest servable audit of any of the audit's addresses, when it is younger than SECURE_TARGET_COOLDOWN
    (None when the cooldown is off)."""
    app_state = state(request)
    cooldown = app_state.settings.target_cooldown
    if cooldown <= 0:
        return None
    return await app_state.store.latest_covering(audit.id, time.time() - cooldown)


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


async def begin(request: Request, plan: Plan, previous_id: str | None = None) -> Started:
    app_state = state(request)
    settings = app_state.settings
    judge = functools.partial(decide, limits=Limits.from_settings(settings), target=plan.target,
                              hosts=plan.tested, services=plan.services, retest=previous_id is not None)
    decision, audit = await app_state.auditor.admit(
        target=plan.target, requester=plan.requester, requester_key=plan.requester_key, hosts=plan.hosts,
        services=plan.services, decide=judge, previous_id=previous_id, verification_id=plan.verification_hash,
        audited_domain=plan.audited_domain, forbidden=plan.forbidden)
    if decision.outcome == "cached" and decision.latest is not None:
        latest = decision.latest
        return Started(latest, cached=True, retest_after=latest.created_at + settings.target_cooldown)
    if audit is None:
        raise refusal(decision)
    return Started(audit)


async def retest(request: Request, audit_id: str, verification_id: str | None = None) -> Started:
    """A new audit of the same target, linked to the previous one; only its requester or verification holder."""
    previous = await load_audit(request, audit_id)
    if not previous.finished:
        raise HTTPException(409, "This test is still running; re-test when it has finished.")
    if previous.target == "self":
        plan = plan_self(request, previous.services)
        if plan.requester != previous.requester:
            raise HTTPException(403, "A re-test must come from the same address as the test it repeats "
                                     f"({previous.requester}); you are visiting from {plan.requester}.")
    else:
        if not verification_id or hash_id(verification_id) != previous.verification_id:
            raise HTTPException(403, "Only the holder of the domain's verification can re-test it: pass its id "
                                     "as \"verification\".")
        plan = await plan_domain(request, previous.target, verification_id, previous.services)
    return await begin(request, plan, previous_id=previous.id)
