"""Limits against abuse: the target's cooldown, per-requester hourly limits, running audits, the global queue."""

import asyncio
import time

import pytest
from support import running_app, wait_done

pytestmark = pytest.mark.both_stores  # the API on SQLite and on PostgreSQL (tests/conftest.py)


async def test_inside_the_cooldown_the_latest_audit_is_served_again(settings):
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        first = await client.post("/api/v1/audits/self")
        assert first.status_code == 202
        again = await client.post("/api/v1/audits", json={"target": "self", "checks": ["relay"]})
        assert again.status_code == 200
        body = again.json()
        assert body["id"] == first.json()["id"]
        assert body["retest_after"] > time.time() + 50
        await wait_done(client, body["id"])
        response = await client.post(f"/api/v1/audits/{body['id']}/retest")
        assert response.status_code == 429
        assert 50 <= int(response.headers["retry-after"]) <= 61
        assert "re-test in" in response.json()["detail"]


async def test_failed_and_interrupted_audits_are_never_served_from_the_cooldown(settings):
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        first = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, first)
        store = client.app.state.sys.store
        await store._run(lambda c: c.execute("UPDATE audits SET status='interrupted' WHERE id=?", (first,)))
        second = await client.post("/api/v1/audits/self")
        assert second.status_code == 202 and second.json()["id"] != first
        await wait_done(client, second.json()["id"])
        await store._run(lambda c: c.execute("UPDATE audits SET status='failed' WHERE id=?", (second.json()["id"],)))
        third = await client.post("/api/v1/audits/self")
        assert third.status_code == 202


async def test_the_cooldown_covers_every_service_of_the_address(settings):
    """A request for more services than the latest audit covered is not a new audit inside the cooldown: 429."""
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        relay_only = await client.post("/api/v1/audits", json={"target": "self", "checks": ["relay"]})
        assert relay_only.status_code == 202
        both = await client.post("/api/v1/audits/self")
        assert both.status_code == 429 and 50 <= int(both.headers["retry-after"]) <= 61
        assert "tested less than 60 seconds ago" in both.json()["detail"]
        proxy_only = await client.post("/api/v1/audits", json={"target": "self", "checks": ["proxy"]})
        assert proxy_only.status_code == 429
        relay_again = await client.post("/api/v1/audits", json={"target": "self", "checks": ["relay"]})
        assert relay_again.status_code == 200 and relay_again.json()["id"] == relay_only.json()["id"]


async def test_two_requesters_never_see_each_others_audit_inside_the_cooldown(settings):
    """The cooldown is keyed by the tested address: requester B (127.0.0.2) asking for a self audit inside the
    cooldown of A's audit of 127.0.0.1 gets a new audit of its own address, never A's audit (nor a refusal);
    each of them asking again inside the cooldown is served its own latest audit."""
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        a = await client.post("/api/v1/audits/self")
        assert a.status_code == 202
        client._transport.client = ("127.0.0.2", 40000)
        b = await client.post("/api/v1/audits/self")
        assert b.status_code == 202, b.text
        assert b.json()["id"] != a.json()["id"]
        a_data, b_data = await wait_done(client, a.json()["id"]), await wait_done(client, b.json()["id"])
        assert a_data["hosts"] == ["127.0.0.1"] and b_data["hosts"] == ["127.0.0.2"]
        assert {c["host"] for c in b_data["checks"]} == {"127.0.0.2"}
        b_again = await client.post("/api/v1/audits/self")
        assert b_again.status_code == 200 and b_again.json()["id"] == b.json()["id"]
        client._transport.client = ("127.0.0.1", 40000)
        a_again = await client.post("/api/v1/audits/self")
        assert a_again.status_code == 200 and a_again.json()["id"] == a.json()["id"]


async def test_an_expired_cooldown_starts_a_new_audit(settings):
    """Inside the cooldown the latest audit is served again; once the cooldown is over, a request starts a new one."""
    settings.target_cooldown = 60
    async with running_app(settings) as client:
        first = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, first)
        inside = await client.post("/api/v1/audits/self")
        assert inside.status_code == 200 and inside.json()["id"] == first
        store = client.app.state.sys.store
        past = time.time() - 61  # the cooldown ended a second ago (still inside the hour's budget)
        await store._run(lambda c: (c.execute("UPDATE audits SET created_at=? WHERE id=?", (past, first)),
                                    c.execute("UPDATE audit_addresses SET created_at=? WHERE audit_id=?",
                                              (past, first))))
        after = await client.post("/api/v1/audits/self")
        assert after.status_code == 202, after.text
        assert after.json()["id"] != first
        await wait_done(client, after.json()["id"])


async def test_audits_per_hour_per_requester(settings):
    settings.audits_per_hour = 2
    async with running_app(settings) as client:
        codes = []
        for _ in range(3):
            response = await client.post("/api/v1/audits/self")
            codes.append(response.status_code)
            if response.status_code == 202:
                await wait_done(client, response.json()["id"])
        assert codes == [202, 202, 429]
        assert int(response.headers["retry-after"]) > 0
        assert "in the last hour" in response.json()["detail"]
        # the HTML form says the same, as a page
        page = await client.get("/start")
        import re
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)
        form = await client.post("/start", data={"csrf": token})
        assert form.status_code == 429 and "in the last hour" in form.text and form.headers["retry-after"]
        # another requester has its own allowance
        transport = client._transport
        transport.client = ("127.0.0.9", 40000)
        assert (await client.post("/api/v1/audits/self")).status_code == 202


async def test_verifications_per_hour(settings):
    settings.verifications_per_hour = 1
    async with running_app(settings) as client:
        assert (await client.post("/api/v1/verifications", json={"domain": "example.com"})).status_code == 201
        response = await client.post("/api/v1/verifications", json={"domain": "example.org"})
        assert response.status_code == 429 and response.headers["retry-after"]


async def test_the_global_limit_queues_and_shows_the_position(settings, silent_port):
    settings.max_running_audits = 1
    settings.proxy_ports = [silent_port]
    settings.relay_ports = []
    settings.connect_timeout = 3
    async with running_app(settings) as client:
        running = (await client.post("/api/v1/audits/self")).json()["id"]
        client._transport.client = ("127.0.0.2", 40000)
        queued = (await client.post("/api/v1/audits/self")).json()["id"]
        await asyncio.sleep(0.2)
        first, second = [(await client.get(f"/api/v1/audits/{i}")).json() for i in (running, queued)]
        assert first["status"] == "running" and first["queue_position"] is None
        assert second["status"] == "queued" and second["queue_position"] == 1
        page = (await client.get(f"/audits/{queued}")).text
        assert "number 1 in line" in page
        await wait_done(client, queued, seconds=15)
