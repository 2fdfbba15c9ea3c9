"""The public JSON under /api/v1 is what /openapi.json says it is: real answers are checked against the schema
component that the schema names for their route, so a model drifting from the answers fails here, and so does an
answer carrying a field the schema does not name (an internal one such as the sink `tag`)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes.dns import FakeDns
from openapi_check import assert_fits, problems, ref, response_schema
from support import running_app, wait_done

from app.config import Settings
from app.main import create_app
from app.verdicts import CheckResult, TranscriptLine, Verdict

pytestmark = pytest.mark.both_stores  # the API on SQLite and on PostgreSQL (tests/conftest.py)

AUDIT = "/api/v1/audits/{audit_id}"
INTERNAL = {"tag", "requester", "requester_key", "verification_id", "id_hash", "opening", "target_key"}

NAMED = [  # (path, method, status): the model the schema names for the answer
    ("/api/v1/audits", "post", 202, "AuditStarted"),
    ("/api/v1/audits", "post", 200, "LatestAudit"),
    ("/api/v1/audits", "post", 403, "Problem"),
    ("/api/v1/audits", "post", 422, "InvalidInput"),
    ("/api/v1/audits/self", "post", 202, "AuditStarted"),
    ("/api/v1/audits/self", "post", 200, "LatestAudit"),
    (AUDIT, "get", 200, "Audit"),
    (AUDIT, "get", 404, "Problem"),
    ("/api/v1/audits/{audit_id}/retest", "post", 202, "AuditStarted"),
    ("/api/v1/audits/{audit_id}/retest", "post", 409, "Problem"),
    ("/api/v1/verifications", "post", 201, "Verification"),
    ("/api/v1/verifications/{verification_id}/check", "post", 200, "VerificationStatus"),
    ("/api/v1/whoami", "get", 200, "WhoAmI"),
    ("/api/v1/guides/{slug}", "get", 200, "Guide"),
    ("/api/v1/reasons", "get", 200, "Reasons"),
]


def schema_of(openapi: dict, path: str, method: str, status: int) -> dict:
    return response_schema(openapi, path, method, status)


def tagged_open_relay() -> CheckResult:
    """An open relay row as the probes leave it: with a fingerprint, guides to match, and the sink tag."""
    return CheckResult("relay", "127.0.0.1", 25, "relay.v1", Verdict.OPEN, "accepted_unconfirmed",
                       fingerprint={"product": "postfix", "version": None, "raw": "220 mx.corp.test ESMTP Postfix"},
                       transcript=[TranscriptLine(0.0, "in", "220 mx.corp.test ESMTP Postfix"),
                                   TranscriptLine(0.1, "out", "RCPT TO:<someone@probe.invalid>"),
                                   TranscriptLine(0.2, "in", "250 2.1.5 Ok")],
                       detail="accepted a foreign recipient", tag="k7tag0sinkproof")


async def events_of(client, audit_id: str) -> list[tuple[str, dict]]:
    async with client.stream("GET", f"/api/v1/audits/{audit_id}/events") as response:
        text = (await response.aread()).decode()
    return [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
            for block in text.split("\n\n") if block.startswith("event:")]


def test_the_schema_names_the_response_model_of_each_route():
    openapi = create_app(Settings(public_url="http://testserver")).openapi()
    for path, method, status, model in NAMED:
        assert schema_of(openapi, path, method, status) == ref(model), (path, method, status)
    listing = schema_of(openapi, "/api/v1/guides", "get", 200)
    assert listing["type"] == "array" and listing["items"] == ref("GuideSummary")
    stream = openapi["paths"]["/api/v1/audits/{audit_id}/events"]["get"]["responses"]["200"]["content"]
    assert stream["text/event-stream"]["x-events"] == {"check": ref("CheckEvent"), "done": ref("DoneEvent")}
    # every 422 is documented as the site answers it ({"detail": [{"loc", "msg", "type"}]}), not FastAPI's default
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            if "422" in operation["responses"]:
                assert schema_of(openapi, path, method, 422) == ref("InvalidInput"), (path, method)
    components = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in components
    leaking = {name: INTERNAL & set(c.get("properties", {})) for name, c in components.items()}
    assert not any(leaking.values()), leaking


async def test_a_finished_audit_and_its_events_match_the_schema(client):
    openapi = (await client.get("/openapi.json")).json()
    started = await client.post("/api/v1/audits/self")
    assert_fits(started.json(), openapi, schema_of(openapi, "/api/v1/audits/self", "post", 202))
    audit_id = started.json()["id"]
    await wait_done(client, audit_id)
    await client.app.state.sys.store.add_check(audit_id, 99, tagged_open_relay())

    audit = (await client.get(f"/api/v1/audits/{audit_id}")).json()
    assert_fits(audit, openapi, schema_of(openapi, AUDIT, "get", 200))
    assert len(audit["checks"]) == 24 and audit["status"] == "done" and audit["queue_position"] is None
    relay = next(c for c in audit["checks"] if c["reason"] == "accepted_unconfirmed")
    assert relay["fingerprint"]["product"] == "postfix" and relay["guides"]
    assert all("change" not in check for check in audit["checks"])  # only a re-test compares

    events = await events_of(client, audit_id)
    assert [kind for kind, _ in events] == ["check"] * 24 + ["done"]
    for kind, payload in events:
        assert_fits(payload, openapi, ref("CheckEvent" if kind == "check" else "DoneEvent"))


async def test_a_queued_audit_matches_the_schema(settings, silent_port):
    settings.max_running_audits = 1
    settings.proxy_ports = [silent_port]
    settings.relay_ports = []
    settings.connect_timeout = 3
    async with running_app(settings) as client:
        openapi = (await client.get("/openapi.json")).json()
        (await client.post("/api/v1/audits/self")).json()
        client._transport.client = ("127.0.0.2", 40000)
        queued = (await client.post("/api/v1/audits/self")).json()["id"]
        await asyncio.sleep(0.2)
        audit = (await client.get(f"/api/v1/audits/{queued}")).json()
        assert audit["status"] == "queued" and audit["queue_position"] == 1 and audit["checks"] == []
        assert_fits(audit, openapi, schema_of(openapi, AUDIT, "get", 200))
        await wait_done(client, queued, seconds=15)


async def test_a_retest_shows_the_change_per_check_as_the_schema_says(client):
    openapi = (await client.get("/openapi.json")).json()
    first = (await client.post("/api/v1/audits/self")).json()["id"]
    await wait_done(client, first)
    retest = await client.post(f"/api/v1/audits/{first}/retest")
    assert_fits(retest.json(), openapi, schema_of(openapi, "/api/v1/audits/{audit_id}/retest", "post", 202))
    second = await wait_done(client, retest.json()["id"])
    assert second["previous_id"] == first and all("change" in check for check in second["checks"])
    assert_fits(second, openapi, schema_of(openapi, AUDIT, "get", 200))


async def test_the_cooldown_answer_matches_the_schema(settings):
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        openapi = (await client.get("/openapi.json")).json()
        await client.post("/api/v1/audits/self")
        for path in ("/api/v1/audits/self", "/api/v1/audits"):
            again = await client.post(path, json={"target": "self"} if path == "/api/v1/audits" else None)
            assert again.status_code == 200 and "retest_after" in again.json()
            assert_fits(again.json(), openapi, schema_of(openapi, path, "post", 200))


async def test_verifications_and_a_domain_audit_match_the_schema(settings):
    async with FakeDns() as dns:
        settings.dns_servers = [dns.server]
        dns.set("corp.test", "A", ["127.0.0.1"])
        async with running_app(settings) as client:
            openapi = (await client.get("/openapi.json")).json()
            created = await client.post("/api/v1/verifications", json={"domain": "corp.test"})
            assert created.status_code == 201
            assert_fits(created.json(), openapi, schema_of(openapi, "/api/v1/verifications", "post", 201))
            check_url = f"/api/v1/verifications/{created.json()['id']}/check"
            answers = [(await client.post(check_url)).json()]
            dns.set(created.json()["dns"]["name"], "TXT", [f'"{created.json()["dns"]["value"]}"'])
            answers.append((await client.post(check_url)).json())
            assert [a["status"] for a in answers] == ["pending", "verified"] and answers[1]["method"] == "dns"
            for answer in answers:
                assert_fits(answer, openapi, schema_of(openapi, "/api/v1/verifications/{verification_id}/check",
                                                       "post", 200))
            started = await client.post("/api/v1/audits", json={"target": "corp.test",
                                                                 "verification": created.json()["id"]})
            assert started.status_code == 202
            assert_fits(started.json(), openapi, schema_of(openapi, "/api/v1/audits", "post", 202))
            audit = await wait_done(client, started.json()["id"])
            assert audit["target"] == "corp.test"
            assert_fits(audit, openapi, schema_of(openapi, AUDIT, "get", 200))


@pytest.mark.parametrize("method,path,body,status,documented", [
    ("get", "/api/v1/audits/AAAAAAAAAAAAAAAAAAAAAA", None, 404, AUDIT),
    ("post", "/api/v1/audits", {"target": "corp.test"}, 403, "/api/v1/audits"),
    ("post", "/api/v1/audits", {"target": "self", "bogus": 1}, 422, "/api/v1/audits"),
    ("post", "/api/v1/verifications", {"domain": "localhost"}, 422, "/api/v1/verifications"),
    ("post", "/api/v1/verifications/AAAAAAAAAAAAAAAAAAAAAA/check", None, 404,
     "/api/v1/verifications/{verification_id}/check"),
])
async def test_errors_match_the_schema(client, method, path, body, status, documented):
    openapi = (await client.get("/openapi.json")).json()
    response = await client.request(method.upper(), path, json=body)
    assert response.status_code == status
    assert_fits(response.json(), openapi, schema_of(openapi, documented, method, status))


async def test_whoami_guides_and_reasons_match_the_schema(client):
    openapi = (await client.get("/openapi.json")).json()
    for path, documented in (("/api/v1/whoami", None), ("/api/v1/guides", None),
                             ("/api/v1/guides?service=relay&q=postfix", "/api/v1/guides"),
                             ("/api/v1/guides/postfix", "/api/v1/guides/{slug}"), ("/api/v1/reasons", None)):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.json(), path
        assert_fits(response.json(), openapi, schema_of(openapi, documented or path, "get", 200))


def test_the_schema_check_catches_an_answer_that_drifts():
    openapi = create_app(Settings(public_url="http://testserver")).openapi()
    check = {"service": "relay", "host": "192.0.2.1", "port": 25, "name": "relay.v1", "verdict": "closed",
             "reason": "relay_denied", "confirmed": False, "fingerprint": None,
             "transcript": [{"t": 0.0, "dir": "in", "text": "554 no"}], "detail": "", "description": "",
             "guides": []}
    audit = {"id": "x" * 22, "status": "done", "target": "self", "hosts": ["192.0.2.1"], "previous_id": None,
             "services": ["relay"], "created_at": 1.0, "finished_at": 2.0, "engine_version": "v", "planned": 1,
             "queue_position": None, "retest_after": None, "error": None, "url": "http://testserver/audits/x",
             "summary": {"relay": "closed", "proxy": None}, "checks": [check]}
    schema = ref("Audit")
    assert problems(audit, schema, openapi) == []
    drifted = [
        {**audit, "checks": [{**check, "tag": "k7tag0sinkproof"}]},  # a leaked internal field
        {k: v for k, v in audit.items() if k != "summary"},  # a field gone
        {**audit, "checks": [{**check, "verdict": "maybe"}]},  # a value outside the vocabulary
        {**audit, "checks": [{**check, "port": "25"}]},  # a type changed
        {**audit, "planned": True},  # a bool is no integer
        {**audit, "checks": [{**check, "transcript": [{"t": 0.0, "dir": "in"}]}]},  # deep inside
        {**audit, "summary": {"relay": "closed", "proxy": None, "web": None}},
    ]
    for answer in drifted:
        assert problems(answer, schema, openapi), answer
