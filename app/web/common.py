"""What the pages and the API share: app state access, the requester, starting audits, audit serialisation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from app.access.requester import RequesterError, requester_address
from app.audits import Auditor
from app.config import Settings
from app.guides import FIX_ANCHOR, GuideLibrary, guide_url
from app.probes import describe_check
from app.probes.canary import Canary
from app.store import Audit, Store
from app.verdicts import CheckResult

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
    app_state: AppState = request.app.state.sys
    return app_state


def requester(request: Request) -> str:
    settings = state(request).settings
    try:
        return str(requester_address(request, settings.trusted_proxy_networks, settings.forwarded_header))
    except RequesterError as exc:
        raise HTTPException(400, f"Cannot tell where this request comes from: {exc}") from None


async def load_audit(request: Request, audit_id: str) -> Audit:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    audit = await state(request).store.get_audit(audit_id)
    if audit is None:
        raise HTTPException(404, "No audit with this id.")
    return audit


def absolute_url(settings: Settings, path: str) -> str:
    return settings.public_url.rstrip("/") + path


def check_json(result: CheckResult, guides: GuideLibrary, settings: Settings) -> dict[str, Any]:
    data = result.to_dict()
    data["description"] = describe_check(result.name)
    data["guides"] = [{"slug": g.slug, "title": g.title,
                       "url": absolute_url(settings, guide_url(g, FIX_ANCHOR if g.service != "general" else ""))}
                      for g in guides.for_check(result)]
    return data


def audit_json(audit: Audit, app_state: AppState, queue_position: int | None = None) -> dict[str, Any]:
    cooldown = app_state.settings.target_cooldown
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
        "queue_position": queue_position,
        "retest_after": audit.created_at + cooldown if cooldown > 0 else None,
        "error": audit.error,
        "url": absolute_url(app_state.settings, f"/audits/{audit.id}"),
        "summary": audit.summary or {"relay": None, "proxy": None},
        "checks": [check_json(c.result, app_state.guides, app_state.settings) for c in audit.checks],
    }
