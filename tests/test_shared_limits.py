"""Several `serve` processes act as one site (issue 16, item 2): two real `serve` processes on one SQLite file and one
real Redis (SECURE_LIMITS_STORAGE=redis://...), attacked as an attacker would, with bounded concurrent bursts over
loopback alternating between both instances. The site-wide numbers must hold for the site, not per instance.

The memory:// cases pin what the README's "Limits across processes" table says stays per process, so the table
cannot lie. app.shared_slots' leases are tried against the same real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fakes.counting import CountingSmtp
from fakes.dns import FakeDns
from support import ServedSite, verified, wait_done_sync

from app.shared_slots import RedisSlots, redis_client

BASE_ENV = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_CONNECT_TIMEOUT": "2", "SECURE_LOG_LEVEL": "WARNING",
            "SECURE_MAX_CONNECTIONS_PER_PEER": "400", "SECURE_PROXY_PORTS": ""}
DB = 5  # the Redis database these tests use (emptied before each)


@pytest.fixture
def shared_redis(redis_server) -> str:
    """The session's real Redis, database DB emptied: a fresh SECURE_LIMITS_STORAGE."""
    url = redis_server.url_for(DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@contextlib.contextmanager
def two_sites(tmp_path: Path, env: dict[str, str], storages: tuple[str, str]) -> Iterator[list[ServedSite]]:
    """Instances A and B of one site: one SQLite file, each its own SECURE_LIMITS_STORAGE, started one after the
    other (a starting instance leaves a live instance's audits alone: tests/test_instances.py)."""
    db = tmp_path / "site.db"
    with contextlib.ExitStack() as stack:
        sites = []
        for name, storage in zip("ab", storages, strict=True):
            folder = tmp_path / name
            folder.mkdir()
            sites.append(stack.enter_context(ServedSite(
                folder, {**BASE_ENV, **env, "SECURE_DATABASE_URL": f"sqlite:///{db}",
                         "SECURE_LIMITS_STORAGE": storage})))
            sites[-1].db = db
        yield sites


async def alternating(sites: list[ServedSite], count: int, path: str, json: dict | None = None,
                      local: str | None = None) -> list[httpx.Response]:
    """`count` POSTs at once, each on its own connection, request i to instance i % 2 (bounded: <= 100, 30 s)."""
    assert count <= 100
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=site.url, limits=limits, timeout=30,
            transport=httpx.AsyncHTTPTransport(local_address=local) if local else None)) for site in sites]
        return list(await asyncio.gather(*(clients[n % 2].post(path, json=json) for n in range(count))))


def audits_in(db: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM audits ORDER BY created_at").fetchall()


def refused_with_retry_after(answers: list[httpx.Response]) -> bool:
    return all(int(r.headers["retry-after"]) > 0 for r in answers if r.status_code == 429)


# --- admission: decided in the store, one write transaction (BEGIN IMMEDIATE) shared by both processes ----------------
@pytest.mark.parametrize("storage", ["redis", "memory"])
async def test_three_audits_per_hour_means_three_for_the_site(tmp_path, refused_port, storage, request):
    """Audit limits live in the shared store, so they hold whatever SECURE_LIMITS_STORAGE says."""
    url = request.getfixturevalue("shared_redis") if storage == "redis" else "memory://"
    env = {"SECURE_RELAY_PORTS": str(refused_port), "SECURE_TARGET_COOLDOWN": "0", "SECURE_AUDITS_PER_HOUR": "3",
           "SECURE_MAX_RUNNING_PER_REQUESTER": "50", "SECURE_AUDITS_PER_TARGET_PER_HOUR": "100"}
    with two_sites(tmp_path, env, (url, url)) as sites:
        answers = await alternating(sites, 40, "/api/v1/audits/self")
        assert Counter(r.status_code for r in answers) == {202: 3, 429: 37}
        assert refused_with_retry_after(answers)
        created = audits_in(sites[0].db)
        assert {r.json()["id"] for r in answers if r.status_code == 202} == {row["id"] for row in created}
        later = await alternating(sites, 2, "/api/v1/audits/self")  # and an hour's budget stays spent on both
        assert [r.status_code for r in later] == [429, 429]


async def test_each_requesters_one_audit_is_decided_once_when_both_instances_are_asked_at_once(tmp_path,
                                                                                               refused_port):
    """40 requesters each ask A and B at the same instant, with one audit per hour each: 40 pairs of admissions
    racing in two processes on one SQLite file. Only a write transaction taken before the facts are read (BEGIN
    IMMEDIATE) gives each pair exactly one audit."""
    env = {"SECURE_RELAY_PORTS": str(refused_port), "SECURE_TARGET_COOLDOWN": "0", "SECURE_AUDITS_PER_HOUR": "1"}
    with two_sites(tmp_path, env, ("memory://", "memory://")) as sites:
        async with contextlib.AsyncExitStack() as stack:
            clients = [[await stack.enter_async_context(httpx.AsyncClient(
                base_url=site.url, timeout=30, transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{10 + n}")))
                for site in sites] for n in range(40)]
            answers = await asyncio.gather(*(c.post("/api/v1/audits/self") for pair in clients for c in pair))
        pairs = [sorted(r.status_code for r in answers[n:n + 2]) for n in range(0, 80, 2)]
        assert Counter(map(tuple, pairs)) == {(202, 429): 40}
        assert len(audits_in(sites[0].db)) == 40


async def test_a_cooldown_started_on_one_instance_holds_on_the_other(tmp_path, refused_port, shared_redis):
    env = {"SECURE_RELAY_PORTS": str(refused_port), "SECURE_TARGET_COOLDOWN": "60"}
    with two_sites(tmp_path, env, (shared_redis, shared_redis)) as a_b:
        first = await alternating(a_b[:1], 1, "/api/v1/audits/self")
        assert first[0].status_code == 202
        audit_id = first[0].json()["id"]
        again = await alternating(a_b[::-1], 20, "/api/v1/audits/self")  # B first, then both
        assert Counter(r.status_code for r in again) == {200: 20}  # the latest audit, served again
        assert {r.json()["id"] for r in again} == {audit_id}
        await asyncio.to_thread(wait_done_sync, a_b[0].url, audit_id)  # a re-test needs it finished (else 409)
        retests = await alternating(a_b[::-1], 10, f"/api/v1/audits/{audit_id}/retest")
        assert Counter(r.status_code for r in retests) == {429: 10}
        assert all(0 < int(r.headers["retry-after"]) <= 60 for r in retests)
        assert len(audits_in(a_b[0].db)) == 1


async def test_a_targets_hourly_budget_holds_across_instances(tmp_path, refused_port, shared_redis):
    """Six names of one address, audited at once through both instances: the address's budget (2) is the site's."""
    async with FakeDns() as dns:
        env = {"SECURE_DNS_SERVERS": dns.server, "SECURE_RELAY_PORTS": str(refused_port),
               "SECURE_TARGET_COOLDOWN": "0", "SECURE_AUDITS_PER_TARGET_PER_HOUR": "2",
               "SECURE_MAX_RUNNING_PER_REQUESTER": "50", "SECURE_AUDITS_PER_HOUR": "50"}
        with two_sites(tmp_path, env, (shared_redis, shared_redis)) as sites:
            for n in range(6):
                dns.set(f"name{n}.test", "A", ["127.0.0.5"])
            clients = [httpx.AsyncClient(base_url=site.url, timeout=30) for site in sites]
            try:
                names = {f"name{n}.test": await verified(clients[n % 2], dns, f"name{n}.test") for n in range(6)}
                answers = await asyncio.gather(*(
                    clients[n % 2].post("/api/v1/audits", json={"target": name, "verification": vid})
                    for n, (name, vid) in enumerate(list(names.items()) * 3)))
            finally:
                for client in clients:
                    await client.aclose()
            assert Counter(r.status_code for r in answers) == {202: 2, 429: 16}
            assert refused_with_retry_after(answers)
            assert len(audits_in(sites[0].db)) == 2


# --- slowapi's limits (SECURE_LIMITS_STORAGE): shared through Redis, per process in memory ---------------------------
@pytest.mark.parametrize("storage, site_wide", [("redis", 3), ("memory", 6)])
async def test_verifications_per_hour_are_the_sites_through_redis(tmp_path, storage, site_wide, request):
    """3 per hour: 3 for the site through Redis; with memory:// each instance counts its own (2 x 3), as the README
    says."""
    url = request.getfixturevalue("shared_redis") if storage == "redis" else "memory://"
    async with FakeDns() as dns:
        env = {"SECURE_DNS_SERVERS": dns.server, "SECURE_VERIFICATIONS_PER_HOUR": "3",
               "SECURE_VERIFICATION_CHECK_INTERVAL": "10"}
        await _verifications_and_checks(tmp_path, env, url, storage, site_wide)


async def _verifications_and_checks(tmp_path, env, url, storage, site_wide) -> None:
    with two_sites(tmp_path, env, (url, url)) as sites:
        answers = await alternating(sites, 30, "/api/v1/verifications", {"domain": "corp.test"})
        assert Counter(r.status_code for r in answers) == {201: site_wide, 429: 30 - site_wide}
        assert refused_with_retry_after(answers)
        created = next(r.json()["id"] for r in answers if r.status_code == 201)
        checks = await alternating(sites, 20, f"/api/v1/verifications/{created}/check")  # one per 10 s
        looked = 1 if storage == "redis" else 2
        assert Counter(r.status_code for r in checks) == {200: looked, 429: 20 - looked}
        assert all(1 <= int(r.headers["retry-after"]) <= 10 for r in checks if r.status_code == 429)


async def test_one_instance_on_memory_breaks_the_sites_count(tmp_path, shared_redis):
    """The rule depends on every instance naming the same Redis: one on memory:// counts alone."""
    env = {"SECURE_VERIFICATIONS_PER_HOUR": "3"}
    with two_sites(tmp_path, env, (shared_redis, "memory://")) as sites:
        answers = await alternating(sites, 30, "/api/v1/verifications", {"domain": "corp.test"})
        assert Counter(r.status_code for r in answers)[201] == 6


# --- open event streams: per requester and site-wide, in Redis -------------------------------------------------------
async def open_stream(site: ServedSite, source: str, audit_id: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port, local_addr=(source, 0))
    writer.write(f"GET /api/v1/audits/{audit_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split()[1]), head.decode("latin-1").lower(), writer


@pytest.mark.parametrize("storage", ["redis", "memory"])
async def test_event_streams_are_capped_across_instances(tmp_path, refused_port, silent_port, storage, request):
    url = request.getfixturevalue("shared_redis") if storage == "redis" else "memory://"
    env = {"SECURE_RELAY_PORTS": str(refused_port), "SECURE_PROXY_PORTS": str(silent_port),
           "SECURE_CONNECT_TIMEOUT": "60",  # the audit keeps running, so its streams stay open
           "SECURE_MAX_EVENT_STREAMS_PER_REQUESTER": "2", "SECURE_MAX_EVENT_STREAMS": "3"}
    writers: list[asyncio.StreamWriter] = []
    with two_sites(tmp_path, env, (url, url)) as sites:
        started = await alternating(sites[:1], 1, "/api/v1/audits/self", {"checks": ["proxy"]})
        audit_id = started[0].json()["id"]
        try:
            mine = await asyncio.gather(*(open_stream(sites[n % 2], "127.0.0.1", audit_id) for n in range(4)))
            writers += [w for *_, w in mine]
            others = [await open_stream(site, "127.0.0.2", audit_id) for site in sites]
            writers += [w for *_, w in others]
            statuses = (sorted(s for s, *_ in mine), [s for s, *_ in others])
            if storage == "redis":  # 2 per requester and 3 on the site, whichever instance they reach
                assert statuses == ([200, 200, 429, 429], [200, 429]), statuses
                assert all("retry-after: 10" in head for s, head, _ in mine + others if s == 429)
                next(w for s, _, w in mine if s == 200).close()  # one stream ends: its slot is the site's again
                await asyncio.sleep(0.5)
                again = await open_stream(sites[1], "127.0.0.3", audit_id)
                writers.append(again[2])
                assert again[0] == 200
            else:  # per process: 2 per requester and 3 in total on each instance
                assert statuses == ([200, 200, 200, 200], [200, 200]), statuses
        finally:  # closed while the loop runs (stopping a site blocks it): the streams end before the sites stop
            for writer in writers:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)


# --- connections to one target address at once (SECURE_MAX_CONNECTIONS_PER_HOST) --------------------------------------
@pytest.mark.parametrize("storage, most", [("redis", 3), ("memory", 6)])
async def test_connections_to_one_address_are_capped_across_instances(tmp_path, storage, most, request):
    url = request.getfixturevalue("shared_redis") if storage == "redis" else "memory://"
    async with CountingSmtp() as smtp:
        env = {"SECURE_RELAY_PORTS": str(smtp.port), "SECURE_TARGET_COOLDOWN": "0",
               "SECURE_AUDITS_PER_TARGET_PER_HOUR": "20", "SECURE_MAX_RUNNING_PER_REQUESTER": "20",
               "SECURE_AUDITS_PER_HOUR": "50"}
        with two_sites(tmp_path, env, (url, url)) as sites:
            answers = await alternating(sites, 6, "/api/v1/audits/self", {"checks": ["relay"]})
            assert [r.status_code for r in answers] == [202] * 6
            deadline = time.monotonic() + 90
            async with httpx.AsyncClient(timeout=10) as client:
                while True:  # bounded: 90 s
                    data = [(await client.get(sites[0].url + f"/api/v1/audits/{r.json()['id']}")).json()
                            for r in answers]
                    if all(d["status"] == "done" for d in data):
                        break
                    assert time.monotonic() < deadline, [d["status"] for d in data]
                    await asyncio.sleep(0.3)
    assert smtp.total >= 6 * 3
    if storage == "redis":
        assert smtp.most <= 3, smtp.most  # the site's cap, though two processes ran audits of it at once
    else:
        assert 3 < smtp.most <= most, smtp.most  # README: N processes x SECURE_MAX_CONNECTIONS_PER_HOST


# --- app.shared_slots' leases against the real Redis ------------------------------------------------------------------
async def test_slots_are_taken_atomically_by_two_clients(shared_redis):
    clients = [redis_client(shared_redis) for _ in range(2)]
    slots = [RedisSlots(client, "t", total=5, per_key=3) for client in clients]
    try:
        tokens = await asyncio.gather(*(slots[n % 2].acquire("192.0.2.1") for n in range(40)))
        assert sum(t is not None for t in tokens) == 3
        others = await asyncio.gather(*(slots[n % 2].acquire(f"192.0.2.{n + 2}") for n in range(6)))
        assert sum(t is not None for t in others) == 2  # 5 on the site
        held = [(n % 2, t) for n, t in enumerate(tokens) if t is not None]
        await slots[held[0][0]].release("192.0.2.1", held[0][1])
        assert await slots[1].acquire("192.0.2.1") is not None
    finally:
        for s, client in zip(slots, clients, strict=True):
            await s.close()
            await client.aclose()


async def test_a_dead_holders_slots_come_back_after_the_lease_and_a_live_one_keeps_them(shared_redis):
    client = redis_client(shared_redis)
    dead, live, other = (RedisSlots(client, "lease", total=None, per_key=1, lease=1.0) for _ in range(3))
    try:
        assert await dead.acquire("a") is not None and await live.acquire("b") is not None
        await dead.close()  # its renewal stops, as when the process is killed
        await asyncio.sleep(1.6)  # past the lease; `live` renewed every 0.25 s
        assert await other.acquire("a") is not None
        assert await other.acquire("b") is None
    finally:
        for slots in (dead, live, other):
            await slots.close()
        await client.aclose()


async def test_without_its_redis_the_site_lets_nothing_pass_uncounted(tmp_path, refused_port):
    """Redis unreachable (nothing listens on its port): what it counts fails closed, as the README says."""
    async with CountingSmtp() as smtp:
        env = {**BASE_ENV, "SECURE_RELAY_PORTS": str(smtp.port), "SECURE_TARGET_COOLDOWN": "0",
               "SECURE_LIMITS_STORAGE": f"redis://127.0.0.1:{refused_port}/0"}
        with ServedSite(tmp_path, env) as site:
            # a connection that carried a 500 is closed by uvicorn: one connection per request
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=site.url, timeout=30, limits=fresh) as client:
                created = await client.post("/api/v1/verifications", json={"domain": "corp.test"})
                assert created.status_code == 500, created.text
                started = await client.post("/api/v1/audits/self", json={"checks": ["relay"]})
                assert started.status_code == 202  # admission is the store's
                audit_id = started.json()["id"]
                events = await client.get(f"/api/v1/audits/{audit_id}/events")
                assert events.status_code == 500
                deadline = time.monotonic() + 60
                while (audit := (await client.get(f"/api/v1/audits/{audit_id}")).json())["status"] != "done":
                    assert time.monotonic() < deadline, audit["status"]
                    await asyncio.sleep(0.3)
    assert {(c["verdict"], c["reason"]) for c in audit["checks"]} == {("error", "internal_error")}
    assert smtp.total == 0  # no connection slot, no connection
