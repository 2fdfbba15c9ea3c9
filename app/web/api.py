"""The JSON API under /api/v1 (the public contract of DESIGN.md)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.audits import Event
from app.verdicts import REASONS, CheckResult
from app.web.common import (AUDIT_ID, absolute_url, audit_json, check_json, load_audit, retest_audit, self_hosts, start_audit, state)

router = APIRouter(prefix="/api/v1", tags=["audits"])

Service = Literal["relay", "proxy"]
HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


class SelfAuditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checks: list[Service] = Field(default=["relay", "proxy"], min_length=1, max_length=2)


class AuditRequest(SelfAuditRequest):
    target: str = Field(min_length=1, max_length=253, description='"self", or a domain you verified')
    verification: str | None = Field(default=None, max_length=64)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if value != "self" and not HOSTNAME.match(value):
            raise ValueError('target must be "self" or a domain name such as mail.example.com')
        return value


class Accepted(BaseModel):
    id: str
    status: str
    url: str


def _accepted(audit: Any, request: Request) -> JSONResponse:
    settings = state(request).settings
    url = absolute_url(settings, f"/audits/{audit.id}")
    return JSONResponse({"id": audit.id, "status": audit.status, "url": url,
                         "api_url": absolute_url(settings, f"/api/v1/audits/{audit.id}")},
                        status_code=202, headers={"Location": url})


async def _start_self(request: Request, services: list[str]) -> JSONResponse:
    requester_addr, hosts = self_hosts(request)
    audit = await start_audit(request, target="self", requester_addr=requester_addr, hosts=hosts,
                              services=services)
    return _accepted(audit, request)


@router.post("/audits", status_code=202, response_model=Accepted,
             responses={403: {"description": "not yours to test"}, 422: {"description": "bad input"}})
async def create_audit(request: Request, body: AuditRequest) -> JSONResponse:
    if body.target == "self":
        if body.verification is not None:
            raise HTTPException(422, 'A "self" audit takes no verification.')
        return await _start_self(request, list(body.checks))
    # Domains are tested only with a verification that proves control of them; the verification flow comes
    # with the domain checks, so no verification can match yet.
    raise HTTPException(403, f"We test {body.target} only after you prove that you control it. "
                             "Start a domain verification first, or test your own address with target \"self\".")


@router.post("/audits/self", status_code=202, response_model=Accepted,
             responses={403: {"description": "not yours to test"}})
async def create_self_audit(request: Request,
                            body: Annotated[SelfAuditRequest | None, Body()] = None) -> JSONResponse:
    return await _start_self(request, list((body or SelfAuditRequest()).checks))


@router.get("/audits/{audit_id}", responses={404: {"description": "unknown audit"}})
async def get_audit(request: Request, audit_id: str) -> dict[str, Any]:
    audit = await load_audit(request, audit_id)
    return audit_json(audit, state(request))


@router.post("/audits/{audit_id}/retest", status_code=202, response_model=Accepted,
             responses={403: {"description": "not yours"}, 404: {"description": "unknown audit"},
                        409: {"description": "still running"}})
async def retest(request: Request, audit_id: str) -> JSONResponse:
    return _accepted(await retest_audit(request, audit_id), request)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get("/audits/{audit_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown audit"}})
async def audit_events(request: Request, audit_id: str) -> StreamingResponse:
    if not AUDIT_ID.match(audit_id):
        raise HTTPException(404, "No audit with this id.")
    await load_audit(request, audit_id)
    app_state = state(request)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        async for event in app_state.auditor.follow(audit_id):
            if event is None:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
            elif event.kind == "check":
                yield _sse("check", _check_event(event, app_state))
            else:
                yield _sse("done", event.data)
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_event(event: Event, app_state: Any) -> dict[str, Any]:
    result: CheckResult = event.data
    data = check_json(result, app_state.guides, app_state.settings)
    data["seq"] = event.seq
    return data


@router.get("/reasons", tags=["vocabulary"])
async def reasons() -> dict[str, Any]:
    """Every reason code with its plain-language explanation and next step (one table for pages, API, CLI)."""
    return {code: {"services": list(r.services), "explanation": r.explanation, "next_step": r.next_step}
            for code, r in REASONS.items()}
