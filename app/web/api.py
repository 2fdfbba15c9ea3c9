"""The JSON API under /api/v1 (the public contract of DESIGN.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from ipaddress import ip_address
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.access.domains import DomainError, normalise_domain
from app.audits import Event
from app.config import Settings
from app.guides import GuideLibrary, guide_url
from app.verdicts import REASONS, CheckResult
from app.web.common import AUDIT_ID, absolute_url, audit_json, check_json, load_audit
from app.web.deps import AuditorDep, GuidesDep, RequesterDep, SettingsDep, StoreDep, StreamSlotsDep
from app.web.report import changes_since, check_key
from app.web.starts import Started, StarterDep
from app.web.verifications import VerifierDep

router = APIRouter(prefix="/api/v1", tags=["audits"])

Service = Literal["relay", "proxy"]
STREAM_RETRY_AFTER = 10  # seconds; a browser's EventSource retries on its own anyway


class SelfAuditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checks: list[Service] = Field(default=["relay", "proxy"], min_length=1, max_length=2)


class AuditRequest(SelfAuditRequest):
    target: str = Field(min_length=1, max_length=253, description='"self", or a domain you verified')
    verification: str | None = Field(default=None, max_length=64, description="the id of the domain's verification")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value.strip().lower() == "self":
            return "self"
        try:
            return normalise_domain(value)
        except DomainError as exc:
            raise ValueError(str(exc)) from None


class RetestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verification: str | None = Field(default=None, max_length=64)


class VerificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(min_length=1, max_length=253)

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        try:
            return normalise_domain(value)
        except DomainError as exc:
            raise ValueError(str(exc)) from None


class Accepted(BaseModel):
    id: str
    status: str
    url: str


def _answer(started: Started, settings: Settings) -> JSONResponse:
    audit = started.audit
    url = absolute_url(settings, f"/audits/{audit.id}")
    body: dict[str, Any] = {"id": audit.id, "status": audit.status, "url": url,
                            "api_url": absolute_url(settings, f"/api/v1/audits/{audit.id}")}
    if started.cached:  # inside the target's cooldown: the latest audit, and when a new one is possible
        body["retest_after"] = started.retest_after
        return JSONResponse(body, status_code=200, headers={"Location": url})
    return JSONResponse(body, status_code=202, headers={"Location": url})


@router.post("/audits", status_code=202, response_model=Accepted,
             responses={200: {"description": "inside the target's cooldown: the latest audit, with retest_after"},
                        403: {"description": "not yours to test"}, 422: {"description": "bad input"},
                        429: {"description": "a limit was reached (Retry-After)"}})
async def create_audit(body: AuditRequest, starter: StarterDep, settings: SettingsDep) -> JSONResponse:
    if body.target == "self":
        if body.verification is not None:
            raise HTTPException(422, 'A "self" audit takes no verification.')
        plan = starter.plan_self(body.checks)
    else:
        plan = await starter.plan_domain(body.target, body.verification, body.checks)
    return _answer(await starter.begin(plan), settings)


@router.post("/audits/self", status_code=202, response_model=Accepted,
             responses={200: {"description": "inside the cooldown"}, 403: {"description": "not yours to test"}})
async def create_self_audit(starter: StarterDep, settings: SettingsDep,
                            body: Annotated[SelfAuditRequest | None, Body()] = None) -> JSONResponse:
    plan = starter.plan_self((body or SelfAuditRequest()).checks)
    return _answer(await starter.begin(plan), settings)


@router.get("/audits/{audit_id}", responses={404: {"description": "unknown audit"}})
async def get_audit(audit_id: str, store: StoreDep, auditor: AuditorDep, guides: GuidesDep,
                    settings: SettingsDep) -> dict[str, Any]:
    audit = await load_audit(store, audit_id)
    position = auditor.queue.position(audit.id) if audit.status == "queued" else None
    data = audit_json(audit, guides, settings, position)
    if audit.previous_id:  # per check: fixed, still_open or newly_open against the audit it repeats
        changes = changes_since(await store.get_audit(audit.previous_id, transcripts=False), audit)
        for check, stored in zip(data["checks"], audit.checks, strict=True):
            check["change"] = changes.get(check_key(stored.result))
    # FastAPI (0.165) writes the dict to JSON bytes in one pass (pydantic-core): measured 7 MiB peak for a 2.3 MiB
    # answer, against 12 MiB through json.dumps and a JSONResponse (a str of the whole answer, then its bytes)
    return data


@router.post("/audits/{audit_id}/retest", status_code=202, response_model=Accepted,
             responses={403: {"description": "not yours"}, 404: {"description": "unknown audit"},
                        409: {"description": "still running"}, 429: {"description": "inside the cooldown"}})
async def retest(audit_id: str, starter: StarterDep, settings: SettingsDep,
                 body: Annotated[RetestRequest | None, Body()] = None) -> JSONResponse:
    return _answer(await starter.retest(audit_id, (body or RetestRequest()).verification), settings)


# --- verifications ----------------------------------------------------------------------------------------
@router.post("/verifications", status_code=201, tags=["verifications"],
             responses={422: {"description": "not a domain"}, 429: {"description": "too many verifications"}})
async def create_verification(body: VerificationRequest, verifier: VerifierDep) -> JSONResponse:
    return JSONResponse(await verifier.create(body.domain), status_code=201)


@router.post("/verifications/{verification_id}/check", tags=["verifications"],
             responses={404: {"description": "unknown verification"}})
async def check_verification(verification_id: str, verifier: VerifierDep) -> dict[str, Any]:
    return await verifier.check(verification_id)


@router.get("/whoami", tags=["audits"])
async def whoami(request: Request, requester: RequesterDep, settings: SettingsDep) -> JSONResponse:
    """The address this request comes from: the start page asks the site's IPv4-only and IPv6-only names, so
    that a dual-stack visitor learns the other address the letter may have named."""
    address = requester.address
    response = JSONResponse({"address": address, "family": f"IPv{ip_address(address).version}"},
                            headers={"Cache-Control": "no-store", "Vary": "Origin"})
    origin = request.headers.get("origin", "")
    if origin and origin == settings.public_url:  # only the site itself may read it cross-origin
        response.headers["Access-Control-Allow-Origin"] = origin
    return response


# --- guides -----------------------------------------------------------------------------------------------
@router.get("/guides", tags=["guides"])
async def list_guides(guides: GuidesDep, settings: SettingsDep, q: Annotated[str, Query(max_length=100)] = "",
                      service: Literal["relay", "proxy", "general"] | None = None) -> list[dict[str, Any]]:
    """Every guide (or those matching `q` and `service`): metadata and the absolute address of its page."""
    return [{**g.summary(), "url": absolute_url(settings, guide_url(g))} for g in guides.search(q, service or "")]


@router.get("/guides/{slug}", tags=["guides"], responses={404: {"description": "unknown guide"}})
async def get_guide(slug: str, guides: GuidesDep, settings: SettingsDep) -> dict[str, Any]:
    guide = guides.get(slug)
    if guide is None:
        raise HTTPException(404, "No guide with this name.")
    return {**guide.summary(), "url": absolute_url(settings, guide_url(guide)),
            "toc": [{"level": level, "anchor": anchor, "title": text} for level, anchor, text in guide.toc],
            "html": guide.html}


def _sse(event: str, data: Any) -> str:
    # UTF-8 as the stream is (a \uXXXX escape would take up to 6 bytes for 1 to 3); JSON escapes CR and LF, so
    # the data stays on one line
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


@router.get("/audits/{audit_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown audit"}})
async def audit_events(request: Request, audit_id: str, store: StoreDep, auditor: AuditorDep, guides: GuidesDep,
                       settings: SettingsDep, requester: RequesterDep, slots: StreamSlotsDep) -> StreamingResponse:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    await load_audit(store, audit_id)
    key = requester.key  # an IPv6 /64 is one requester
    if not slots.acquire(key):
        raise HTTPException(429, "Too many open event streams; close one, or poll GET /api/v1/audits/{id}.",
                            headers={"Retry-After": str(STREAM_RETRY_AFTER)})

    async def stream() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        async for event in auditor.follow(audit_id):
            if event is None:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
            elif event.kind == "check":
                yield _sse("check", _check_event(event, guides, settings))
            else:
                yield _sse("done", event.data)
                return

    return CountedStream(lambda: slots.release(key), stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class CountedStream(StreamingResponse):
    """Gives its stream slot back however the response ends (done, client gone, error), even if never started."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _check_event(event: Event, guides: GuideLibrary, settings: Settings) -> dict[str, Any]:
    result: CheckResult = event.data
    data = check_json(result, guides, settings)
    data["seq"] = event.seq
    return data


@router.get("/reasons", tags=["vocabulary"])
async def reasons() -> dict[str, Any]:
    """Every reason code with its plain-language explanation and next step (one table for pages, API, CLI)."""
    return {code: {"services": list(r.services), "explanation": r.explanation, "next_step": r.next_step}
            for code, r in REASONS.items()}
