"""Domain verifications, shared by the API and the HTML steps: create one, look at it, check the proof."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerSecond

from app.access.addresses import budget_key
from app.access.domains import DNS_LABEL, WELL_KNOWN, Proof, check_dns, check_http, hash_id, new_secret, token_value
from app.web.common import absolute_url, requester, state
from app.web.starts import resolver_for, the_requester_key

VERIFICATION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def instructions(domain: str, token: str) -> dict[str, Any]:
    return {"dns": {"name": f"{DNS_LABEL}.{domain}", "type": "TXT", "value": token_value(token)},
            "http": {"url": f"http://{domain}{WELL_KNOWN}", "body": token}}


def spend(request: Request, item: RateLimitItem, kind: str, key: str) -> int | None:
    """Take one from a limit in slowapi's limiter (memory, or Redis when several processes share it); the hit
    is taken before any work, in one step, so concurrent requests cannot all pass. None when allowed, else the
    seconds until the limit allows one more."""
    limiter = request.app.state.limiter.limiter
    if limiter.hit(item, kind, key):
        return None
    reset, _remaining = limiter.get_window_stats(item, kind, key)
    return max(1, int(reset - time.time()) + 1)


def limited(request: Request, item: RateLimitItem, kind: str, key: str, message: str, when: bool = True) -> None:
    """429 with Retry-After when the limit is spent; `message` may name {wait} seconds or {minutes}."""
    wait = spend(request, item, kind, key) if when else None
    if wait is not None:
        raise HTTPException(429, message.format(wait=wait, minutes=wait // 60 + 1), headers={"Retry-After": str(wait)})


def fetch_budget(request: Request, domain: str) -> Callable[[str], bool]:
    """Whether one more HTTP fetch of the verification file may go to `address` now: at most
    SECURE_VERIFICATION_FETCHES_PER_DOMAIN_PER_HOUR for the domain and ..._PER_ADDRESS_PER_HOUR for the
    address (many names can point at one address), whoever asks."""
    settings = state(request).settings
    per_domain = RateLimitItemPerHour(settings.verification_fetches_per_domain_per_hour)
    per_address = RateLimitItemPerHour(settings.verification_fetches_per_address_per_hour)

    def may_fetch(address: str) -> bool:
        return (spend(request, per_domain, "verification-fetch-domain", domain) is None
                and spend(request, per_address, "verification-fetch-address", budget_key(address)) is None)
    return may_fetch


async def create(request: Request, domain: str) -> dict[str, Any]:
    """A new verification of an already normalised domain; its id is returned here once, and stored hashed."""
    app_state = state(request)
    settings = app_state.settings
    who = requester(request)
    limited(request, RateLimitItemPerHour(settings.verifications_per_hour), "verifications",
            the_requester_key(request), f"You have started {settings.verifications_per_hour} domain verifications "
            "in the last hour, the most we allow from one address. Try again in {minutes} minutes.")
    verification_id, token = new_secret(), new_secret()
    expires_at = time.time() + settings.verification_days * 86400
    await app_state.store.create_verification(hash_id(verification_id), domain, token, who, expires_at)
    return {"id": verification_id, "domain": domain, "token": token, "expires_at": expires_at,
            **instructions(domain, token),
            "check_url": absolute_url(settings, f"/api/v1/verifications/{verification_id}/check")}


async def load(request: Request, verification_id: str) -> dict[str, Any]:
    if not VERIFICATION_ID.match(verification_id):
        raise HTTPException(404, "No verification with this id.")
    record = await state(request).store.get_verification(hash_id(verification_id))
    if record is None:
        raise HTTPException(404, "No verification with this id.")
    return record


def status_of(record: dict[str, Any]) -> str:
    if float(record["expires_at"]) < time.time():
        return "expired"
    return "verified" if record["verified_at"] else "pending"


async def check(request: Request, verification_id: str) -> dict[str, Any]:
    """Look for the proof now (DNS first, then the HTTP file); a verified one stays verified until it expires."""
    record = await load(request, verification_id)
    domain, token = str(record["domain"]), str(record["token"])
    answer = {"domain": domain, "expires_at": record["expires_at"], "method": record["method"]}
    status = status_of(record)
    if status == "expired":
        return {**answer, "status": "expired", "detail": "This verification has expired; start a new one."}
    if status == "verified":
        return {**answer, "status": "verified", "detail": f"{domain} is verified."}
    settings = state(request).settings
    limited(request, RateLimitItemPerSecond(1, max(1, round(settings.verification_check_interval))),
            "verification-check", str(record["id_hash"]),
            "This verification was checked a moment ago; check again in {wait} seconds.",
            when=settings.verification_check_interval > 0)
    limited(request, RateLimitItemPerHour(settings.verification_checks_per_hour), "verification-checks",
            the_requester_key(request), f"You have checked verifications {settings.verification_checks_per_hour} "
            "times in the last hour, the most we allow from one address. Try again in {minutes} minutes.")
    resolver = resolver_for(request)
    proof = await check_dns(domain, token, resolver)
    if not proof.verified:
        http_proof = await check_http(domain, token, resolver, settings.allowed_networks,
                                      may_fetch=fetch_budget(request, domain))
        proof = http_proof if http_proof.verified else Proof(False, None, f"{proof.detail}; {http_proof.detail}")
    if proof.verified:
        await state(request).store.mark_verified(hash_id(verification_id), proof.method or "")
        return {**answer, "status": "verified", "method": proof.method, "detail": proof.detail}
    return {**answer, "status": "pending", "detail": proof.detail}


# What the verify page may say after "Check now": the site's own sentences only, picked by a code in the redirect.
# (It once printed `?detail=` verbatim, so anyone could put a forged notice on an official page.)
NOTICES = {
    "no_txt": "We found no TXT record at {dns_name} yet (DNS changes can take a while to appear), "
              "and not the file either.",
    "txt_wrong": "The TXT record at {dns_name} does not hold the code, and we did not find the file either. "
                 "Compare the record's value with the one above.",
    "not_found": "We did not find the code yet, neither in DNS nor in the file on the web server.",
    "wait": "We looked for the code a moment ago. Wait a few seconds, then check again.",
}


def notice_code(result: dict[str, Any]) -> str:
    """The notice for a pending check (a verified or expired one shows its own page)."""
    detail = str(result.get("detail", ""))
    if detail.startswith("no TXT record"):
        return "no_txt"
    if detail.startswith("the TXT record"):
        return "txt_wrong"
    return "not_found"


def notice_text(code: str, domain: str) -> str:
    template = NOTICES.get(code)
    return template.format(dns_name=f"{DNS_LABEL}.{domain}") if template else ""
