"""What the pages and the API share: an audit by its id, absolute links, an audit's public JSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

from app.config import Settings
from app.guides import FIX_ANCHOR, Guide, GuideLibrary, guide_url
from app.probes import describe_check
from app.store import Audit, Store
from app.verdicts import SERVICES, CheckResult

AUDIT_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


async def load_audit(store: Store, audit_id: str) -> Audit:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    audit = await store.get_audit(audit_id)
    if audit is None:
        raise HTTPException(404, "No audit with this id.")
    return audit


def absolute_url(settings: Settings, path: str) -> str:
    return settings.public_url.rstrip("/") + path


def check_json(result: CheckResult, guides: GuideLibrary, settings: Settings) -> dict[str, Any]:
    """A check as the API and the event stream show it (schemas.Check): what it tries, and the guides that match."""
    return check_fields(result, guides.for_check(result), settings)


def check_fields(result: CheckResult, matched: Sequence[Guide], settings: Settings) -> dict[str, Any]:
    """check_json with the matching guides already found (app/web/public.py stores it once per check)."""
    data = result.to_dict()
    del data["tag"]  # internal: how our sink recognises the check's relayed message
    extra = data.pop("data") or {}
    if result.service == "blocklist":  # a list's answer: no port; its codes, reason text and removal page
        data["port"] = None
        data.update({key: extra.get(key) for key in ("codes", "txt", "removal_url")})
    data["description"] = describe_check(result.name)
    data["guides"] = [{"slug": g.slug, "title": g.title,
                       "url": absolute_url(settings, guide_url(g, FIX_ANCHOR if g.service != "general" else ""))}
                      for g in matched]
    return data


def audit_head(audit: Audit, settings: Settings, queue_position: int | None = None) -> dict[str, Any]:
    """An audit as GET /api/v1/audits/{id} shows it (schemas.Audit), but for its checks, which come last."""
    cooldown = settings.target_cooldown
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
        "url": absolute_url(settings, f"/audits/{audit.id}"),
        "summary": {**dict.fromkeys(SERVICES), **(audit.summary or {})},
    }

