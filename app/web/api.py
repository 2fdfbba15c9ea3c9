"""The JSON API under /api/v1 (the public contract of DESIGN.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from app.access.domains import DomainError, normalise_domain
from app.audits import Event
from app.config import Settings
from app.guides import guide_url
from app.verdicts import REASONS, CheckResult
from app.web import schemas
from app.web.common import AUDIT_ID, absolute_url, load_audit
from app.web.deps import AuditorDep, GuidesDep, RequesterDep, SettingsDep, ShownDep, StoreDep, StreamSlotsDep
from app.web.public import Shown, with_field
from app.web.report import changes_since, check_key
from app.web.starts import Started, StarterDep
from app.web.verifications import VerifierDep

router = APIRouter(prefix="/api/v1", tags=["audits"])

Service = Literal["relay", "proxy", "blocklist"]
STREAM_RETRY_AFTER = 10  # seconds; a browser's EventSource retries on its own anyway
ANY_JSON: TypeAdapter[Any] = TypeAdapter(Any)  # plain dicts and lists to JSON bytes, as FastAPI writes them


class SelfAuditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checks: list[Service] = Field(default=["relay", "proxy", "blocklist"], min_length=1, max_length=3)


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


Responses = dict[int | str, dict[str, Any]]  # what a route documents besides its success answer


def _problem(description: str) -> dict[str, Any]:
    return {"model": schemas.Problem, "description": description}


INVALID_INPUT: Responses = {422: {"model": schemas.InvalidInput, "description": "bad input"}}
NO_AUDIT: Responses = {404: _problem("unknown or malformed audit id"), **INVALID_INPUT}
LIMITED: Responses = {429: _problem("a limit was reached; Retry-After says when to come back")}
CACHED: Responses = {200: {"model": schemas.LatestAudit,
                           "description": "inside the target's cooldown: the latest audit of the same target"}}


def _answer(started: Started, settings: Settings) -> JSONResponse:
    """202 with the new audit, or 200 with the latest one inside the target's cooldown; Location: its page."""
    audit = started.audit
    url = absolute_url(settings, f"/audits/{audit.id}")
    api_url = absolute_url(settings, f"/api/v1/audits/{audit.id}")
    if started.cached:  # inside the target's cooldown: the latest audit, and when a new one is possible
        latest = schemas.LatestAudit.model_validate({"id": audit.id, "status": audit.status, "url": url,
                                                     "api_url": api_url, "retest_after": started.retest_after})
        return JSONResponse(latest.model_dump(), status_code=200, headers={"Location": url})
    body = schemas.AuditStarted.model_validate({"id": audit.id, "status": audit.status, "url": url,
                                                "api_url": api_url})
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


@router.post("/audits", status_code=202, response_model=schemas.AuditStarted,
             responses={**CACHED, 403: _problem("not yours to test"), **INVALID_INPUT, **LIMITED,
                        503: _problem("DNS failed, or the site is busy (Retry-After)")})
async def create_audit(body: AuditRequest, starter: StarterDep, settings: SettingsDep) -> JSONResponse:
    if body.target == "self":
        if body.verification is not None:
            raise HTTPException(422, 'A "self" audit takes no verification.')
        plan = starter.plan_self(body.checks)
    else:
        plan = await starter.plan_domain(body.target, body.verification, body.checks)
    return _answer(await starter.begin(plan), settings)


@router.post("/audits/self", status_code=202, response_model=schemas.AuditStarted,
             responses={**CACHED, 403: _problem("not yours to test"), **INVALID_INPUT, **LIMITED})
async def create_self_audit(starter: StarterDep, settings: SettingsDep,
                            body: Annotated[SelfAuditRequest | None, Body()] = None) -> JSONResponse:
    plan = starter.plan_self((body or SelfAuditRequest()).checks)
    return _answer(await starter.begin(plan), settings)


@router.get("/audits/{audit_id}", response_model=schemas.Audit, responses=NO_AUDIT)
async def get_audit(audit_id: str, store: StoreDep, auditor: AuditorDep, shown: ShownDep) -> Response:
    audit = await shown.load(store, audit_id) if AUDIT_ID.match(audit_id) else None
    if audit is None:
        raise HTTPException(404, "No audit with this id.")
    position = await auditor.queue_position(audit.id) if audit.status == "queued" else None
    changes = None
    if audit.previous_id:  # per check: fixed, still_open or newly_open against the audit it repeats
        since = changes_since(await store.get_audit(audit.previous_id, transcripts=False), audit)
        changes = [since.get(check_key(stored.result)) for stored in audit.checks]
    # Written as it is, not through the response model: validating 45 checks' transcripts into models made this
    # answer about a fifth slower, and the tests hold the real answers to the model's schema. Each check's JSON
    # was serialised once, when it was stored (app/web/public.py); the answer writes those objects in as they are.
    return Response(shown.audit_bytes(audit, position, changes), media_type="application/json")


@router.post("/audits/{audit_id}/retest", status_code=202, response_model=schemas.AuditStarted,
             responses={403: _problem("not yours to re-test"), **NO_AUDIT, 409: _problem("still running"),
                        429: _problem("inside the cooldown, or a limit was reached (Retry-After)")})
async def retest(audit_id: str, starter: StarterDep, settings: SettingsDep,
                 body: Annotated[RetestRequest | None, Body()] = None) -> JSONResponse:
    return _answer(await starter.retest(audit_id, (body or RetestRequest()).verification), settings)


# --- verifications ----------------------------------------------------------------------------------------
@router.post("/verifications", status_code=201, tags=["verifications"], response_model=schemas.Verification,
             responses={**INVALID_INPUT, 429: _problem("too many verifications (Retry-After)")})
async def create_verification(body: VerificationRequest, verifier: VerifierDep) -> JSONResponse:
    return JSONResponse(await verifier.create(body.domain), status_code=201)


@router.post("/verifications/{verification_id}/check", tags=["verifications"],
             response_model=schemas.VerificationStatus,
             responses={404: _problem("unknown verification"), **INVALID_INPUT,
                        429: _problem("checked too often (Retry-After)")})
async def check_verification(verification_id: str, verifier: VerifierDep) -> dict[str, Any]:
    return await verifier.check(verification_id)


@router.get("/whoami", tags=["audits"], response_model=schemas.WhoAmI)
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
@router.get("/guides", tags=["guides"], response_model=list[schemas.GuideSummary], responses=INVALID_INPUT)
async def list_guides(guides: GuidesDep, settings: SettingsDep, q: Annotated[str, Query(max_length=100)] = "",
                      service: Literal["relay", "proxy", "general"] | None = None) -> list[dict[str, Any]]:
    """Every guide (or those matching `q` and `service`): metadata and the absolute address of its page."""
    return [{**g.summary(), "url": absolute_url(settings, guide_url(g))} for g in guides.search(q, service or "")]


@router.get("/guides/{slug}", tags=["guides"], response_model=schemas.Guide,
            responses={404: _problem("unknown guide"), **INVALID_INPUT})
async def get_guide(slug: str, guides: GuidesDep, settings: SettingsDep) -> dict[str, Any]:
    guide = guides.get(slug)
    if guide is None:
        raise HTTPException(404, "No guide with this name.")
    return {**guide.summary(), "url": absolute_url(settings, guide_url(guide)),
            "toc": [{"level": level, "anchor": anchor, "title": text} for level, anchor, text in guide.toc],
            "causes": [{"id": c.id, "title": c.title, "check": c.check, "fix": list(c.fix)} for c in guide.causes],
            "html": guide.html}


def _sse(event: str, data: Any) -> str:
    # UTF-8 as the stream is (a \uXXXX escape would take up to 6 bytes for 1 to 3); JSON escapes CR and LF, so
    # the data stays on one line
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


@router.get("/audits/{audit_id}/events", response_class=StreamingResponse,
            responses={200: {"description": "server-sent events: `check` (CheckEvent) per finished check, then "
                                            "`done` (DoneEvent)"},
                       **NO_AUDIT, 429: _problem("too many open event streams (Retry-After)")})
async def audit_events(request: Request, audit_id: str, store: StoreDep, auditor: AuditorDep, shown: ShownDep,
                       requester: RequesterDep, slots: StreamSlotsDep) -> StreamingResponse:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    await load_audit(store, audit_id)
    key = requester.key  # an IPv6 /64 is one requester
    token = await slots.acquire(key)
    if token is None:
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
                yield f"event: check\ndata: {_check_event(event, shown)}\n\n"
            else:
                yield _sse("done", event.data)
                return

    return CountedStream(lambda: slots.release(key, token), stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class CountedStream(StreamingResponse):
    """Gives its stream slot back however the response ends (done, client gone, error), even if never started."""

    def __init__(self, release: Callable[[], Awaitable[None]], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.release()


def _check_event(event: Event, shown: Shown) -> str:
    """The payload of `event: check` (schemas.CheckEvent), serialised: the check's JSON as the auditor stored it
    (made once, not per follower), and its seq. JSON escapes CR and LF, so it stays on one line."""
    result: CheckResult = event.data
    return with_field(shown.public(result, event.derived), "seq", event.seq)


@router.get("/reasons", tags=["vocabulary"], response_model=schemas.Reasons)
async def reasons() -> dict[str, Any]:
    """Every reason code with its plain-language explanation and next step (one table for pages, API, CLI)."""
    return {code: {"services": list(r.services), "explanation": r.explanation, "next_step": r.next_step}
            for code, r in REASONS.items()}


def document_event_stream(app: FastAPI) -> None:
    """Add the event stream's payloads (schemas.CheckEvent, schemas.DoneEvent) to the app's OpenAPI schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas.add_event_schemas(build())  # build() keeps what it returns as app.openapi_schema
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
