import asyncio
import json

import pytest
from support import running_app, wait_done

TWO = {"checks": ["relay", "proxy"]}  # the probed services alone (the blocklist rows have their own tests)
pytestmark = pytest.mark.both_stores  # the API on SQLite and on PostgreSQL (tests/conftest.py)


async def test_self_audit_runs_end_to_end(client, refused_port, open_port):
    response = await client.post("/api/v1/audits/self")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["url"] == f"http://testserver/audits/{body['id']}"
    data = await wait_done(client, body["id"])
    assert data["status"] == "done" and data["target"] == "self" and data["hosts"] == ["127.0.0.1"]
    assert data["summary"] == {"relay": "unreachable", "proxy": "inconclusive", "blocklist": "not_listed"}
    rows = {(c["service"], c["port"]): c for c in data["checks"]}
    assert rows[("relay", refused_port)]["reason"] == "refused"
    assert rows[("proxy", open_port)]["verdict"] == "inconclusive"
    assert rows[("proxy", open_port)]["reason"] == "port_open"
    for check in data["checks"]:
        assert set(check) >= {"service", "host", "port", "name", "verdict", "reason", "confirmed", "fingerprint",
                              "transcript", "guides"}
        assert check["host"] == "127.0.0.1" and check["confirmed"] is False
        assert all(set(line) == {"t", "dir", "text"} for line in check["transcript"])


async def test_generic_endpoint_and_check_choice(client):
    response = await client.post("/api/v1/audits", json={"target": "self", "checks": ["proxy"]})
    assert response.status_code == 202
    data = await wait_done(client, response.json()["id"])
    assert data["summary"]["relay"] is None and {c["service"] for c in data["checks"]} == {"proxy"}


async def test_loopback_is_refused_without_allow_networks(settings):
    settings.allow_networks = []
    async with running_app(settings) as client:
        response = await client.post("/api/v1/audits/self")
        assert response.status_code == 403
        detail = response.json()["detail"]
        assert "127.0.0.1" in detail and "public Internet" in detail


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.1.1", "169.254.1.1", "100.64.0.1", "::1", "fe80::1",
                                  "fc00::1", "::ffff:10.0.0.1"])
async def test_private_peers_are_refused(settings, peer):
    settings.allow_networks = []
    async with running_app(settings, peer=peer) as client:
        response = await client.post("/api/v1/audits/self")
        assert response.status_code == 403, peer


async def test_spoofed_forwarding_headers_from_an_untrusted_peer_change_nothing(client):
    response = await client.post("/api/v1/audits/self", headers={"X-Forwarded-For": "203.0.113.9",
                                                                  "Forwarded": "for=198.51.100.4"})
    data = await wait_done(client, response.json()["id"])
    assert data["hosts"] == ["127.0.0.1"]


async def test_trusted_proxy_forwards_the_client(settings):
    settings.trusted_proxies = ["10.0.0.0/8"]
    async with running_app(settings, peer="10.9.9.9") as client:
        response = await client.post("/api/v1/audits/self", headers={"X-Forwarded-For": "6.6.6.6, 127.0.0.5"})
        assert response.status_code == 202
        data = await wait_done(client, response.json()["id"])
        assert data["hosts"] == ["127.0.0.5"]  # the right-most untrusted hop, not the left-most claim


async def test_an_unreadable_forwarded_address_is_a_400_only_where_the_address_matters(settings):
    """The requester is worked out when a handler first needs it: a trusted proxy's junk header does not hide
    the answer a request gets for other reasons."""
    settings.trusted_proxies = ["10.0.0.0/8"]
    async with running_app(settings, peer="10.9.9.9") as client:
        junk = {"X-Forwarded-For": "not-an-address"}
        response = await client.post("/api/v1/audits/self", headers=junk)
        assert response.status_code == 400 and "not-an-address" in response.json()["detail"]
        response = await client.post("/api/v1/audits", json={"target": "corp.test"}, headers=junk)
        assert response.status_code == 403 and "prove that you control it" in response.json()["detail"]
        assert (await client.get("/api/v1/reasons", headers=junk)).status_code == 200


BAD_BODIES = [
    (b"{", "application/json"), (b"[]", "application/json"), (b'"self"', "application/json"),
    (b'{"target": ""}', "application/json"), (b'{"target": 5}', "application/json"),
    (b'{"target": "self", "checks": []}', "application/json"),
    (b'{"target": "self", "checks": ["smtp"]}', "application/json"),
    (b'{"target": "self", "checks": "relay"}', "application/json"),
    (b'{"target": "self", "extra": 1}', "application/json"),
    (b'{"target": "' + b"a" * 300 + b'.com"}', "application/json"),
    (b'{"target": "exa mple.com"}', "application/json"),
    (b'{"target": "-bad-.com"}', "application/json"),
    (b'{"target": "\\u0000.com"}', "application/json"),
    (b'{"target": "self", "verification": "x"}', "application/json"),
    (b"\xff\xfe", "application/json"),
    (b"target=self", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize("body,ctype", BAD_BODIES)
async def test_bad_input_is_4xx_json(client, body, ctype):
    response = await client.post("/api/v1/audits", content=body, headers={"Content-Type": ctype})
    assert 400 <= response.status_code < 500, response.text
    assert "detail" in response.json()


@pytest.mark.parametrize("body", [b"{", b'{"checks": ["x"]}', b'{"target": "self"}', b"[1]"])
async def test_bad_input_to_self_endpoint_is_422(client, body):
    response = await client.post("/api/v1/audits/self", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "detail" in response.json()


async def test_domain_without_verification_is_403(client):
    response = await client.post("/api/v1/audits", json={"target": "Example.COM."})
    assert response.status_code == 403
    assert "example.com" in response.json()["detail"]


@pytest.mark.parametrize("audit_id", ["nope", "A" * 22, "../../etc/passwd", "%00", "a" * 500, "' or 1=1 --"])
async def test_unknown_or_malformed_ids_are_404(client, audit_id):
    for path in (f"/api/v1/audits/{audit_id}", f"/api/v1/audits/{audit_id}/events"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"]
    response = await client.post(f"/api/v1/audits/{audit_id}/retest")
    assert response.status_code == 404


async def test_events_replay_then_done(client):
    audit_id = (await client.post("/api/v1/audits/self", json=TWO)).json()["id"]
    async with client.stream("GET", f"/api/v1/audits/{audit_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = ""
        async for chunk in response.aiter_text():
            text += chunk
            if "event: done" in text:
                break
    events = [block for block in text.split("\n\n") if block.startswith("event:")]
    kinds = [block.split("\n")[0] for block in events]
    assert kinds == ["event: check"] * 23 + ["event: done"]
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert done["status"] == "done" and done["summary"]["proxy"] == "inconclusive"
    # a finished audit replays everything, then done
    async with client.stream("GET", f"/api/v1/audits/{audit_id}/events") as response:
        replay = (await response.aread()).decode()
    assert replay.count("event: check") == 23 and replay.count("event: done") == 1


async def test_the_sink_tag_stays_out_of_the_api_and_the_event_stream(client):
    """A relayed message's proof tag is how our sink recognises it: internal, so neither the audit's JSON nor its
    live events show it, while the store keeps it for the sink's confirmation."""
    from app.verdicts import CheckResult, TranscriptLine, Verdict

    tag = "k7tag0sinkproof"
    audit_id = (await client.post("/api/v1/audits/self", json=TWO)).json()["id"]
    await wait_done(client, audit_id)
    store = client.app.state.sys.store
    await store.add_check(audit_id, 99, CheckResult(
        "relay", "127.0.0.1", 25, "relay.v1", Verdict.OPEN, "accepted_unconfirmed",
        transcript=[TranscriptLine(0.0, "in", "250 2.1.5 Ok")], tag=tag))
    response = await client.get(f"/api/v1/audits/{audit_id}")
    assert any(c["reason"] == "accepted_unconfirmed" for c in response.json()["checks"])
    assert all("tag" not in check for check in response.json()["checks"]) and tag not in response.text
    async with client.stream("GET", f"/api/v1/audits/{audit_id}/events") as stream:
        events = (await stream.aread()).decode()
    assert events.count("event: check") == 24 and '"accepted_unconfirmed"' in events and tag not in events
    assert (await store.find_check_by_tag(tag))[0] == audit_id


async def test_retest_links_to_the_previous_audit(client):
    first = (await client.post("/api/v1/audits/self")).json()["id"]
    await wait_done(client, first)
    response = await client.post(f"/api/v1/audits/{first}/retest")
    assert response.status_code == 202
    second = await wait_done(client, response.json()["id"])
    assert second["previous_id"] == first and second["id"] != first


async def test_retest_from_another_address_is_403(settings):
    async with running_app(settings) as client:
        first = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, first)
        transport = client._transport  # same app, another peer
        transport.client = ("127.0.0.2", 40000)
        response = await client.post(f"/api/v1/audits/{first}/retest")
        assert response.status_code == 403
        assert "127.0.0.1" in response.json()["detail"]


async def test_retest_while_running_is_409(settings, silent_port):
    settings.proxy_ports = [silent_port]
    settings.connect_timeout = 5
    async with running_app(settings) as client:
        first = (await client.post("/api/v1/audits/self")).json()["id"]
        response = await client.post(f"/api/v1/audits/{first}/retest")
        assert response.status_code == 409


async def test_running_audits_per_requester_are_limited(settings, silent_port):
    settings.proxy_ports = [silent_port]
    settings.connect_timeout = 5
    settings.max_running_per_requester = 2
    async with running_app(settings) as client:
        codes = [(await client.post("/api/v1/audits/self")).status_code for _ in range(3)]
        assert codes == [202, 202, 429]


async def test_reasons_matrix(client):
    data = (await client.get("/api/v1/reasons")).json()
    assert data["port_open"]["explanation"] and "relay" in data["refused"]["services"]


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_openapi_lists_the_contract(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/api/v1/audits", "/api/v1/audits/self", "/api/v1/audits/{audit_id}",
                 "/api/v1/audits/{audit_id}/events", "/api/v1/audits/{audit_id}/retest"):
        assert path in paths


async def test_concurrent_audits_from_one_requester_do_not_mix(settings):
    settings.max_running_per_requester = 5
    async with running_app(settings) as client:
        ids = [(await client.post("/api/v1/audits/self", json=TWO)).json()["id"] for _ in range(4)]
        results = await asyncio.gather(*(wait_done(client, i) for i in ids))
        assert all(len(r["checks"]) == 23 for r in results)


async def test_old_audits_are_purged_at_start(settings):
    import time

    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        store = client.app.state.sys.store
        await store._run(lambda c: c.execute("UPDATE audits SET created_at=? WHERE id=?",
                                             (time.time() - (settings.retention_days + 1) * 86400, audit_id)))
    async with running_app(settings) as client:
        await asyncio.sleep(0.1)
        assert (await client.get(f"/api/v1/audits/{audit_id}")).status_code == 404


async def test_random_junk_never_makes_a_500(client):
    """A bounded, seeded fuzz of every API endpoint with junk bodies, content types and ids."""
    import random

    rng = random.Random(20261127)
    audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
    await wait_done(client, audit_id)
    paths = ["/api/v1/audits", "/api/v1/audits/self", f"/api/v1/audits/{audit_id}/retest", "/api/v1/audits/x/retest"]
    atoms = [None, True, 0, -1, 1e308, "", "self", "x" * 1000, "é.com", "a..b", [], {}, ["relay"] * 5,
             {"target": "self"}, "\u0000", "127.0.0.1", "[::1]", "*", "relay", "proxy"]
    for _ in range(150):
        kind = rng.random()
        if kind < 0.4:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:
            obj = {rng.choice(["target", "checks", "verification", "x"]): rng.choice(atoms)
                   for _ in range(rng.randint(0, 4))}
            body = json.dumps(obj).encode()
        ctype = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])
        path = rng.choice(paths)
        response = await client.post(path, content=body, headers={"Content-Type": ctype} if ctype else {})
        assert response.status_code < 500, (path, body, response.text)
        assert response.headers["content-type"].startswith("application/json")
    for _ in range(50):
        junk = "".join(rng.choice("abcXYZ019-_%./~") for _ in range(rng.randint(1, 40)))
        response = await client.get(f"/api/v1/audits/{junk}")
        assert response.status_code in (307, 404, 405), junk  # 307: a trailing slash is dropped


async def test_self_over_ipv6(settings):
    settings.allow_networks = ["::1/128"]
    settings.relay_ports = []
    async with running_app(settings, peer="::1") as client:
        response = await client.post("/api/v1/audits/self")
        assert response.status_code == 202
        data = await wait_done(client, response.json()["id"])
        assert data["hosts"] == ["::1"] and {c["host"] for c in data["checks"]} == {"::1"}


async def test_expired_verifications_are_purged_with_old_audits(settings):
    import time

    async with running_app(settings) as client:
        created = (await client.post("/api/v1/verifications", json={"domain": "example.com"})).json()
        store = client.app.state.sys.store
        old = time.time() - (settings.retention_days + 1) * 86400
        await store._run(lambda c: c.execute("UPDATE verifications SET expires_at=?", (old,)))
    async with running_app(settings) as client:
        await asyncio.sleep(0.1)
        response = await client.post(f"/api/v1/verifications/{created['id']}/check")
        assert response.status_code == 404


async def test_whoami_and_its_cross_origin_rule(settings):
    settings.public_url = "https://audit.example"
    settings.ipv6_url = "https://ipv6.audit.example"
    async with running_app(settings) as client:
        response = await client.get("/api/v1/whoami", headers={"Origin": "https://audit.example"})
        assert response.json() == {"address": "127.0.0.1", "family": "IPv4"}
        assert response.headers["access-control-allow-origin"] == "https://audit.example"
        other = await client.get("/api/v1/whoami", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        page = await client.get("/start")
        assert "connect-src 'self' https://ipv6.audit.example" in page.headers["content-security-policy"]
        assert 'data-url="https://ipv6.audit.example"' in page.text
