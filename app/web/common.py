"""What the pages and the API share: app state access, the requester, starting audits, audit serialisation."""

from __future__ import annotations

import re
from ipaddress import ip_address
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi import HTTPException, Request

from app.access.requester import RequesterError, requester_address
from app.access.targets import ForbiddenTarget, guard
from app.audits import Auditor
from app.config import Settings
from app.guides import GuideLibrary
from app.probes import describe_check
from app.probes.canary import Canary
from app.store import Audit, Store
from app.verdicts import REASONS, CheckResult

AUDIT_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


@dataclass
class AppState:
    settings: Settings
    store: Store
    auditor: Auditor
    guides: GuideLibrary
    secret: str
    canary: Canary


def state(request: Request) -> AppState:
    return request.app.state.sys


def requester(request: Request) -> str:
    settings = state(request).settings
    try:
        return str(requester_address(request, settings.trusted_proxy_networks, settings.forwarded_header))
    except RequesterError as exc:
        raise HTTPException(400, f"Cannot tell where this request comes from: {exc}") from None


def self_hosts(request: Request) -> tuple[str, list[str]]:
    """(requester, hosts) for a `self` audit, or 403 with a plain explanation."""
    address = requester(request)
    try:
        guard(ip_address(address), state(request).settings.allowed_networks)
    except ForbiddenTarget as exc:
        raise HTTPException(403, str(exc)) from None
    return address, [address]


async def load_audit(request: Request, audit_id: str) -> Audit:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    audit = await state(request).store.get_audit(audit_id)
    if audit is None:
        raise HTTPException(404, "No audit with this id.")
    return audit


async def start_audit(request: Request, *, target: str, requester_addr: str, hosts: Sequence[str],
                      services: Sequence[str], previous_id: str | None = None) -> Audit:
    app_state = state(request)
    if await app_state.store.count_running(requester_addr) >= app_state.settings.max_running_per_requester:
        raise HTTPException(429, "You already have the most audits running at once that we allow; "
                                 "wait for one to finish.", headers={"Retry-After": "30"})
    order = [s for s in ("relay", "proxy") if s in services]
    return await app_state.auditor.start(target=target, requester=requester_addr, hosts=hosts, services=order,
                                         previous_id=previous_id)


async def retest_audit(request: Request, audit_id: str) -> Audit:
    """A new audit of the same target, linked to the previous one; only its own requester may ask for it."""
    previous = await load_audit(request, audit_id)
    if not previous.finished:
        raise HTTPException(409, "This audit is still running; re-test when it has finished.")
    if previous.target != "self":
        raise HTTPException(403, "Only the holder of the domain's verification can re-test it.")
    requester_addr, hosts = self_hosts(request)
    if requester_addr != previous.requester:
        raise HTTPException(403, "A re-test must come from the same address as the audit it repeats "
                                 f"({previous.requester}); you are visiting from {requester_addr}.")
    return await start_audit(request, target="self", requester_addr=requester_addr, hosts=hosts,
                             services=previous.services, previous_id=previous.id)


def absolute_url(settings: Settings, path: str) -> str:
    return settings.public_url.rstrip("/") + path


def check_json(result: CheckResult, guides: GuideLibrary, settings: Settings) -> dict[str, Any]:
    data = result.to_dict()
    data["description"] = describe_check(result.name)
    data["guides"] = [{"slug": g.slug, "title": g.title, "url": absolute_url(settings, f"/guides/{g.slug}")}
                      for g in guides.for_check(result)]
    return data


def audit_json(audit: Audit, app_state: AppState) -> dict[str, Any]:
    return {
        "id": audit.id,
        "status": audit.status,
        "target": audit.target,
        "hosts": audit.hosts,
        "previous_id": audit.previous_id,
        "services": audit.services,
        "created_at": audit.created_at,
        "finished_at": audit.finished_at,
        "engine_version": audit.engine_version,
        "planned": audit.planned,
        "error": audit.error,
        "url": absolute_url(app_state.settings, f"/audits/{audit.id}"),
        "summary": audit.summary or {"relay": None, "proxy": None},
        "checks": [check_json(c.result, app_state.guides, app_state.settings) for c in audit.checks],
    }


def reason_text(code: str) -> dict[str, str]:
    reason = REASONS[code]
    return {"explanation": reason.explanation, "next_step": reason.next_step}
