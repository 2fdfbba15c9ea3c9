"""Domain verifications, shared by the API and the HTML steps: create one, look at it, check the proof."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerSecond
from limits.strategies import RateLimiter

from app.access.addresses import budget_key
from app.access.domains import DNS_LABEL, WELL_KNOWN, Proof, check_dns, check_http, hash_id, new_secret, token_value
from app.config import Settings
from app.store import Store
from app.web.common import absolute_url
from app.web.deps import RateLimiterDep, Requester, RequesterDep, SettingsDep, StoreDep
from app.web.starts import resolver_for

VERIFICATION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def instructions(domain: str, token: str) -> dict[str, Any]:
    return {"dns": {"name": f"{DNS_LABEL}.{domain}", "type": "TXT", "value": token_value(token)},
            "http": {"url": f"http://{domain}{WELL_KNOWN}", "body": token}}


def spend(limiter: RateLimiter, item: RateLimitItem, kind: str, key: str) -> int | None:
    """Take one from a limit in slowapi's limiter (memory, or Redis when several processes share it); the hit
    is taken before any work, in one step, so concurrent requests cannot all pass. None when allowed, else the
    seconds until the limit allows one more."""
    if limiter.hit(item, kind, key):
        return None
    reset, _remaining = limiter.get_window_stats(item, kind, key)
    return max(1, int(reset - time.time()) + 1)


def limited(limiter: RateLimiter, item: RateLimitItem, kind: str, key: str, message: str,
            when: bool = True) -> None:
    """429 with Retry-After when the limit is spent; `message` may name {wait} seconds or {minutes}."""
    wait = spend(limiter, item, kind, key) if when else None
    if wait is not None:
        raise HTTPException(429, message.format(wait=wait, minutes=wait // 60 + 1), headers={"Retry-After": str(wait)})


def fetch_budget(settings: Settings, limiter: RateLimiter, domain: str) -> Callable[[str], bool]:
    """Whether one more HTTP fetch of the verification file may go to `address` now: at most
    SECURE_VERIFICATION_FETCHES_PER_DOMAIN_PER_HOUR for the domain and ..._PER_ADDRESS_PER_HOUR for the
    address (many names can point at one address), whoever asks."""
    per_domain = RateLimitItemPerHour(settings.verification_fetches_per_domain_per_hour)
    per_address = RateLimitItemPerHour(settings.verification_fetches_per_address_per_hour)

    def may_fetch(address: str) -> bool:
        return (spend(limiter, per_domain, "verification-fetch-domain", domain) is None
                and spend(limiter, per_address, "verification-fetch-address", budget_key(address)) is None)
    return may_fetch


async def load(store: Store, verification_id: str) -> dict[str, Any]:
    if not VERIFICATION_ID.match(verification_id):
        raise HTTPException(404, "No verification with this id.")
    record = await store.get_verification(hash_id(verification_id))
    if record is None:
        raise HTTPException(404, "No verification with this id.")
    return record


def status_of(record: dict[str, Any]) -> str:
    if float(record["expires_at"]) < time.time():
        return "expired"
    return "verified" if record["verified_at"] else "pending"


@dataclass
class Verifier:
    """Creates and checks the domain verifications one request asks for, from the API or a form."""

    settings: Settings
    store: Store
    limiter: RateLimiter
    requester: Requester

    async def create(self, domain: str) -> dict[str, Any]:
        """A new verification of an already normalised domain; its id is returned here once, and stored hashed."""
        settings = self.settings
        who = self.requester.address
        limited(self.limiter, RateLimitItemPerHour(settings.verifications_per_hour), "verifications",
                self.requester.key, f"You have started {settings.verifications_per_hour} domain verifications "
                "in the last hour, the most we allow from one address. Try again in {minutes} minutes.")
        verification_id, token = new_secret(), new_secret()
        expires_at = time.time() + settings.verification_days * 86400
        await self.store.create_verification(hash_id(verification_id), domain, token, who, expires_at)
        return {"id": verification_id, "domain": domain, "token": token, "expires_at": expires_at,
                **instructions(domain, token),
                "check_url": absolute_url(settings, f"/api/v1/verifications/{verification_id}/check")}

    async def check(self, verification_id: str) -> dict[str, Any]:
        """Look for the proof now (DNS first, then the HTTP file); a verified one stays verified until it expires."""
        record = await load(self.store, verification_id)
        domain = str(record["domain"])
        answer = {"domain": domain, "expires_at": record["expires_at"], "method": record["method"]}
        status = status_of(record)
        if status == "expired":
            return {**answer, "status": "expired", "detail": "This verification has expired; start a new one."}
        if status == "verified":
            return {**answer, "status": "verified", "detail": f"{domain} is verified."}
        self._spend_a_check(str(record["id_hash"]))
        proof = await self._look_for_proof(domain, str(record["token"]))
        if proof.verified:
            await self.store.mark_verified(hash_id(verification_id), proof.method or "")
            return {**answer, "status": "verified", "method": proof.method, "detail": proof.detail}
        return {**answer, "status": "pending", "detail": proof.detail}

    def _spend_a_check(self, id_hash: str) -> None:
        """One check of this verification per SECURE_VERIFICATION_CHECK_INTERVAL, so many per requester an hour."""
        settings = self.settings
        limited(self.limiter, RateLimitItemPerSecond(1, max(1, round(settings.verification_check_interval))),
                "verification-check", id_hash,
                "This verification was checked a moment ago; check again in {wait} seconds.",
                when=settings.verification_check_interval > 0)
        limited(self.limiter, RateLimitItemPerHour(settings.verification_checks_per_hour), "verification-checks",
                self.requester.key, f"You have checked verifications {settings.verification_checks_per_hour} "
                "times in the last hour, the most we allow from one address. Try again in {minutes} minutes.")

    async def _look_for_proof(self, domain: str, token: str) -> Proof:
        resolver = resolver_for(self.settings)
        proof = await check_dns(domain, token, resolver)
        if proof.verified:
            return proof
        http_proof = await check_http(domain, token, resolver, self.settings.allowed_networks,
                                      may_fetch=fetch_budget(self.settings, self.limiter, domain))
        return http_proof if http_proof.verified else Proof(False, None, f"{proof.detail}; {http_proof.detail}")


async def get_verifier(settings: SettingsDep, store: StoreDep, limiter: RateLimiterDep,
                 requester: RequesterDep) -> Verifier:
    return Verifier(settings, store, limiter, requester)


VerifierDep = Annotated[Verifier, Depends(get_verifier)]


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
