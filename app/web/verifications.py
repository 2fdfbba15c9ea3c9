"""Domain verifications, shared by the API and the HTML steps: create one, look at it, check the proof."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import HTTPException, Request

from app.access.domains import (DNS_LABEL, WELL_KNOWN, Proof, check_dns, check_http, hash_id, new_secret,
                                token_value)
from app.web.common import absolute_url, requester, state
from app.web.starts import check_hourly, resolver_for

VERIFICATION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def instructions(domain: str, token: str) -> dict[str, Any]:
    return {"dns": {"name": f"{DNS_LABEL}.{domain}", "type": "TXT", "value": token_value(token)},
            "http": {"url": f"http://{domain}{WELL_KNOWN}", "body": token}}


async def create(request: Request, domain: str) -> dict[str, Any]:
    """A new verification of an already normalised domain; its id is returned here once, and stored hashed."""
    app_state = state(request)
    settings = app_state.settings
    who = requester(request)
    check_hourly(request, "verifications", settings.verifications_per_hour, who, hit=True)
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
    resolver = resolver_for(request)
    proof = await check_dns(domain, token, resolver)
    if not proof.verified:
        http_proof = await check_http(domain, token, resolver, state(request).settings.allowed_networks)
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
