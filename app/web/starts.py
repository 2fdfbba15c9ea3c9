"""Who may start what: the plan of an audit request (own address or verified domain), then the limits.

Shared by the API and the HTML forms. Order of refusals: bad input (422) and not yours (403) first, then the
target's cooldown (the latest audit is served again, 200), then the requester's limits (429 with Retry-After).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Sequence

from fastapi import HTTPException, Request
from limits import RateLimitItemPerHour

from app.access.domains import hash_id
from app.access.resolver import ResolveError, Resolver
from app.access.targets import ForbiddenTarget, guard, resolve_guarded
from app.audits import Forbidden
from app.store import Audit
from app.verdicts import SERVICES
from app.web.common import load_audit, requester, state

@dataclass
class Plan:
    target: str  # "self" or the domain
    target_key: str
    requester: str
    services: list[str]
    hosts: dict[str, list[str]]
    forbidden: list[Forbidden] = field(default_factory=list)
    verification_hash: str | None = None
    audited_domain: str | None = None


@dataclass
class Started:
    audit: Audit
    cached: bool = False  # the latest audit of this target, served again inside the cooldown
    retest_after: float | None = None


def _order(services: Sequence[str]) -> list[str]:
    return [s for s in SERVICES if s in services]


def plan_self(request: Request, services: Sequence[str]) -> Plan:
    address = requester(request)
    try:
        guard(ip_address(address), state(request).settings.allowed_networks)
    except ForbiddenTarget as exc:
        raise HTTPException(403, str(exc)) from None
    ordered = _order(services)
    return Plan("self", f"ip:{address}", address, ordered, {s: [address] for s in ordered})


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
    hosts: dict[str, list[str]] = {}
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
            for name in names[:10]:  # every MX host, each address tested on its own (IPv4 and IPv6)
                resolved = await resolve_guarded(name, resolver, settings.allowed_networks)
                addresses.extend(a for a in resolved.allowed if a not in addresses)
                for address, why in resolved.refused:
                    refused.setdefault(address, f"{name} resolves to {address}, and {why}")
            hosts[service] = addresses
            forbidden.extend(Forbidden(service, address, why) for address, why in refused.items())
    except ResolveError as exc:
        raise HTTPException(503, f"We could not look up {domain}: {exc}. Try again in a minute.",
                            headers={"Retry-After": "60"}) from None
    if not any(hosts.values()):
        why = "; ".join(f.why for f in forbidden) or f"{domain} has no address for the requested checks"
        raise HTTPException(403, f"Nothing of {domain} can be tested: {why}.")
    return Plan(domain, f"domain:{domain}", requester(request), ordered, hosts, forbidden, id_hash, domain)


def check_hourly(request: Request, kind: str, amount: int, key: str, hit: bool) -> None:
    """`kind` per hour per requester (slowapi's limiter and storage); 429 with Retry-After when spent."""
    limiter = request.app.state.limiter.limiter
    item = RateLimitItemPerHour(amount)
    allowed = limiter.hit(item, kind, key) if hit else limiter.test(item, kind, key)
    if not allowed:
        reset, _remaining = limiter.get_window_stats(item, kind, key)
        retry = max(1, int(reset - time.time()) + 1)
        what = {"audits": "tests", "verifications": "domain verifications"}[kind]
        raise HTTPException(429, f"You have started {amount} {what} in the last hour, the most we allow from one "
                                 f"address. Try again in {retry // 60 + 1} minutes.",
                            headers={"Retry-After": str(retry)})


async def in_cooldown(request: Request, target_key: str | None) -> Audit | None:
    """The target's latest servable audit, when it is younger than SECURE_TARGET_COOLDOWN (None when it is off)."""
    cooldown = state(request).settings.target_cooldown
    if cooldown <= 0 or not target_key:
        return None
    return await state(request).store.latest_for_target(target_key, time.time() - cooldown)


async def begin(request: Request, plan: Plan, previous_id: str | None = None) -> Started:
    app_state = state(request)
    settings = app_state.settings
    if previous_id is None:  # a re-test refuses inside the cooldown (retest); a new request is served the latest
        latest = await in_cooldown(request, plan.target_key)
        if latest is not None and set(plan.services) <= set(latest.services):
            return Started(latest, cached=True, retest_after=latest.created_at + settings.target_cooldown)
    if await app_state.store.count_running(plan.requester) >= settings.max_running_per_requester:
        raise HTTPException(429, "You already have the most tests running at once that we allow; wait for one "
                                 "to finish, then try again.", headers={"Retry-After": "30"})
    check_hourly(request, "audits", settings.audits_per_hour, plan.requester, hit=False)
    audit = await app_state.auditor.start(
        target=plan.target, requester=plan.requester, hosts=plan.hosts, services=plan.services,
        previous_id=previous_id, verification_id=plan.verification_hash, audited_domain=plan.audited_domain,
        forbidden=plan.forbidden, target_key=plan.target_key)
    check_hourly(request, "audits", settings.audits_per_hour, plan.requester, hit=True)
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
    settings = state(request).settings
    latest = await in_cooldown(request, plan.target_key)
    if latest is not None:
        wait = max(1, int(latest.created_at + settings.target_cooldown - time.time()) + 1)
        raise HTTPException(429, f"This server was tested less than {settings.target_cooldown:g} seconds ago. "
                                 f"You can re-test in {wait} seconds.", headers={"Retry-After": str(wait)})
    return await begin(request, plan, previous_id=previous.id)
