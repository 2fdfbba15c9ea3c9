"""The public JSON of /api/v1 as pydantic models: what /openapi.json (and /docs) documents, field for field as the
README's API table says. Clients depend on these names: add fields, never rename or remove one.

Internal fields (a relayed message's sink `tag`, the requester and its key, hashed verification ids, a
transcript's shared opening) have no place here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel
from pydantic.json_schema import models_json_schema

AuditStatus = Literal["queued", "running", "done", "failed", "interrupted"]
VerdictName = Literal["open", "closed", "auth_required", "inconclusive", "unreachable", "error", "listed",
                      "not_listed"]
ServiceName = Literal["relay", "proxy", "blocklist"]
ChangeName = Literal["fixed", "still_open", "newly_open", "delisted", "still_listed", "newly_listed"]


class TranscriptLine(BaseModel):
    t: float = Field(description="seconds since the check started")
    dir: Literal["out", "in", "info"] = Field(description="out: we sent; in: the server sent; info: what happened")
    text: str = Field(description="the line, non-printable bytes escaped as \\xNN")


class Fingerprint(BaseModel):
    product: str | None = Field(description="the recognised software, or null")
    version: str | None
    raw: str = Field(description="what it was recognised from (a banner or headers), at most 512 characters")


class GuideLink(BaseModel):
    slug: str
    title: str
    url: str = Field(description="absolute; the guide's Fix section for a product guide")


class Check(BaseModel):
    service: ServiceName
    host: str = Field(description="an address")
    port: int | None = Field(description="0 for a row about an address that was not tested (relay.guard, proxy.guard); "
                                         "null for a blocklist row (it asks DNS, not a port of the address)")
    name: str = Field(description="a stable id service.check, e.g. relay.v12, proxy.connect_smtp")
    verdict: VerdictName
    reason: str = Field(description="a reason code (GET /api/v1/reasons)")
    confirmed: bool = Field(description="relay: our tagged message reached our own sink")
    fingerprint: Fingerprint | None
    transcript: list[TranscriptLine]
    detail: str
    description: str = Field(description="what the check tries, in one line")
    guides: list[GuideLink]
    change: ChangeName | None = Field(
        default=None, description="only in a re-test (previous_id set): against the audit it repeats; blocklist rows: "
                                  "delisted, still_listed, newly_listed")
    codes: list[str] | None = Field(default=None, description="blocklist rows only: the A records (return codes)")
    txt: list[str] | None = Field(default=None, description="blocklist rows only: the list's TXT reason, when listed")
    removal_url: str | None = Field(default=None, description="blocklist rows only: the list's lookup and removal page")


class Summary(BaseModel):
    relay: VerdictName | None = Field(description="null when not requested or not finished")
    proxy: VerdictName | None
    blocklist: VerdictName | None = Field(default=None, description="listed if any list names an address; "
                                                                    "null when not requested (or an older audit)")


class Audit(BaseModel):
    id: str
    status: AuditStatus
    target: str = Field(description='"self" or the domain, as requested')
    hosts: list[str] = Field(description="the addresses tested")
    previous_id: str | None = Field(description="the audit this one re-tests")
    services: list[ServiceName]
    created_at: float
    finished_at: float | None
    engine_version: str
    planned: int = Field(description="how many checks are planned")
    queue_position: int | None = Field(description="while queued: the place in line")
    retest_after: float | None = Field(description="when a new audit of the target is possible (with a cooldown)")
    error: str | None
    url: str = Field(description="the result page (absolute)")
    summary: Summary
    checks: list[Check]


class AuditStarted(BaseModel):
    id: str
    status: AuditStatus
    url: str = Field(description="the result page (absolute); also the Location header")
    api_url: str = Field(description="this audit in the API (absolute)")


class LatestAudit(AuditStarted):
    """Inside the target's cooldown: the latest audit of the same target, served again."""

    retest_after: float = Field(description="when a new audit of the target is possible (Unix time)")


class DnsProof(BaseModel):
    name: str
    type: Literal["TXT"]
    value: str


class HttpProof(BaseModel):
    url: str
    body: str


class Verification(BaseModel):
    id: str = Field(description="shown once and stored hashed: whoever holds it may audit the domain")
    domain: str
    token: str
    expires_at: float
    dns: DnsProof = Field(description="create the TXT record name = value")
    http: HttpProof = Field(description="or serve body at url")
    check_url: str


class VerificationStatus(BaseModel):
    domain: str
    expires_at: float
    method: Literal["dns", "http"] | None
    status: Literal["pending", "verified", "expired"]
    detail: str = Field(description="what was found")


class WhoAmI(BaseModel):
    address: str
    family: Literal["IPv4", "IPv6"]


class GuideSummary(BaseModel):
    slug: str
    title: str
    service: Literal["relay", "proxy", "general"]
    products: list[str]
    versions: str
    sources: list[str]
    updated: str
    url: str


class TocEntry(BaseModel):
    level: int
    anchor: str
    title: str


class Cause(BaseModel):
    id: str
    title: str = Field(description="inline Markdown")
    check: str = Field(description="the anchor of the Check subsection that looks for it")
    fix: list[str] = Field(description="the anchors of the Fix subsections that remove it")


class Guide(GuideSummary):
    toc: list[TocEntry]
    causes: list[Cause] = Field(description="product guides: every way the product ends up open that the guide "
                                            "covers; empty for general guides")
    html: str


class ReasonText(BaseModel):
    services: list[ServiceName]
    explanation: str
    next_step: str


class Reasons(RootModel[dict[str, ReasonText]]):
    """Every reason code with its plain-language explanation and next step."""


class Problem(BaseModel):
    """Every refusal: 400, 403, 404, 409, 413, 429 and 503 (with Retry-After where it says when to come back)."""

    detail: str


class InputError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidInput(BaseModel):
    """422: what was wrong with the input, per field."""

    detail: list[InputError]


class CheckEvent(Check):
    """`event: check` of GET /api/v1/audits/{id}/events: a check, again with the same seq when it changes."""

    seq: int


class DoneEvent(BaseModel):
    """`event: done`, the last event of the stream."""

    status: AuditStatus
    summary: Summary | None


def add_event_schemas(openapi: dict[str, Any]) -> None:
    """Name the event stream's payloads in the schema: OpenAPI 3.1 cannot describe server-sent events, so the
    models go into the components and the stream's media type points at them (an `x-` extension)."""
    _, top = models_json_schema([(CheckEvent, "serialization"), (DoneEvent, "serialization")],
                                ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    stream = openapi["paths"]["/api/v1/audits/{audit_id}/events"]["get"]["responses"]["200"]
    stream.setdefault("content", {})["text/event-stream"] = {
        "schema": {"type": "string"},
        "x-events": {"check": {"$ref": "#/components/schemas/CheckEvent"},
                     "done": {"$ref": "#/components/schemas/DoneEvent"}},
    }
