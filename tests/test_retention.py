"""Retention: the purge deletes what expired (and its rows) in short batches, lets other store calls run between
them, runs beside the site rather than before it, and keeps running after a failed batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time

import pytest
from support import running_app

from app import ENGINE_VERSION, retention
from app.store import SCHEMA_VERSION, Audit, Store, new_id
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict

DAY = 86400.0


async def add_audit(store: Store, age_days: float, previous_id: str | None = None, checks: int = 3) -> str:
    """A finished audit `age_days` old with `checks` relay rows sharing one opening, and its address."""
    host = f"192.0.2.{int(age_days) % 250 + 1}"
    audit = Audit(id=new_id(), created_at=time.time() - age_days * DAY, status="queued", target="self",
                  requester=host, hosts=[host], services=["relay"], planned=checks, engine_version=ENGINE_VERSION,
                  previous_id=previous_id)
    await store.create_audit(audit, [host])
    opening = Opening(new_id(), [TranscriptLine(0.0, "info", f"connecting to {host}:25"),
                                 TranscriptLine(0.1, "in", "220 mx.example ESMTP")])
    for seq in range(1, checks + 1):
        own = [TranscriptLine(0.2, "out", "RCPT TO:<x@sink.example>"), TranscriptLine(0.3, "in", "554 denied")]
        await store.add_check(audit.id, seq, CheckResult(
            "relay", host, 25, f"relay.v{seq}", Verdict.CLOSED, "relay_denied",
            transcript=[*opening.lines, *own], opening=opening, tag=new_id()))
    await store.finish_audit(audit.id, "done", {"relay": "closed", "proxy": None})
    return audit.id


def count(store_path: str, sql: str) -> int:
    conn = sqlite3.connect(store_path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def stored_count(store: Store, sql: str) -> int:
    """A count read through the store itself (SQLite or PostgreSQL)."""
    return await store._run(lambda c: int(c.execute(sql).fetchone()[0]))


ORPHANS = "SELECT " + " + ".join(f"(SELECT COUNT(*) FROM {table} WHERE audit_id NOT IN (SELECT id FROM audits))"
                     for table in ("checks", "openings", "audit_addresses"))


async def seed(store: Store, expired: int, recent: int) -> tuple[list[str], list[str]]:
    """`expired` audits past a 90-day retention (every other one a re-test of the one before) and `recent` within
    it (the first a re-test of an expired one, the second a re-test of the first)."""
    old: list[str] = []
    for number in range(expired):
        old.append(await add_audit(store, 100 + number, previous_id=old[-1] if old and number % 2 else None))
    kept: list[str] = []
    for number in range(recent):
        previous = old[0] if number == 0 and old else (kept[-1] if kept else None)
        kept.append(await add_audit(store, 10 + number, previous_id=previous))
    return old, kept


@pytest.mark.both_stores
async def test_everything_expired_goes_with_its_rows_and_everything_recent_stays(store):
    old, kept = await seed(store, expired=12, recent=3)
    for days in (200, 95, 5):  # verifications: two expired before the cutoff, one still valid
        await store.create_verification(new_id(), "example.com", "token", "192.0.2.1", time.time() - days * DAY)
    report = await retention.purge(store, time.time() - 90 * DAY)
    assert (report.audits, report.verifications) == (12, 2)
    assert all([await store.get_audit(audit_id) is None for audit_id in old])
    survivors = [await store.get_audit(audit_id) for audit_id in kept]
    assert all(audit is not None and len(audit.checks) == 3 for audit in survivors)
    assert [len(audit.checks[0].result.opening.lines) for audit in survivors] == [2, 2, 2]
    assert survivors[0].previous_id is None  # its predecessor expired: the link went with it
    assert survivors[1].previous_id == kept[0]  # a link between kept audits stays
    assert await stored_count(store, ORPHANS) == 0
    assert await stored_count(store, "SELECT COUNT(*) FROM checks") == 9
    assert await stored_count(store, "SELECT COUNT(*) FROM openings") == 3
    assert await stored_count(store, "SELECT COUNT(*) FROM audit_addresses") == 3
    assert await stored_count(store, "SELECT COUNT(*) FROM verifications") == 1
    again = await retention.purge(store, time.time() - 90 * DAY)
    assert (again.audits, again.verifications, again.batches) == (0, 0, 1)


@pytest.mark.both_stores
async def test_unfinished_audits_are_never_purged(store):
    audit = Audit(id=new_id(), created_at=time.time() - 200 * DAY, status="queued", target="self",
                  requester="192.0.2.9", hosts=["192.0.2.9"], services=["relay"], planned=1,
                  engine_version=ENGINE_VERSION)
    await store.create_audit(audit, ["192.0.2.9"])
    await store.mark_running(audit.id)
    report = await retention.purge(store, time.time() - 90 * DAY)
    assert report.audits == 0 and (await store.get_audit(audit.id)).status == "running"


@pytest.mark.both_stores
async def test_many_expired_audits_go_in_several_batches(store):
    await seed(store, expired=9, recent=1)
    sizes: list[int] = []
    report = await retention.purge(store, time.time() - 90 * DAY, target=0.0,
                                   on_batch=lambda batch: sizes.append(batch.audits))
    assert sum(sizes) == 9 and report.batches == len(sizes) >= 9
    assert max(sizes) == 1  # a target of zero: one statement of one audit per transaction


async def test_the_batch_size_follows_the_measured_cost():
    pace = retention.Pace(target=0.04)
    assert pace.limit == retention.LIMIT_START
    pace.after(retention.PurgeBatch(audits=4, verifications=0, worked=0.001, held=0.002, done=False))
    assert pace.limit == 2 * retention.LIMIT_START  # cheap: grows, at most doubling
    for _ in range(20):
        pace.after(retention.PurgeBatch(audits=pace.limit, verifications=0, worked=pace.limit * 0.002,
                                        held=pace.limit * 0.004, done=False))
    assert pace.limit == 10  # 4 ms an audit: ten fit in 40 ms
    pace.after(retention.PurgeBatch(audits=10, verifications=0, worked=0.1, held=0.4, done=False))
    assert 1 <= pace.limit < 10  # one slow batch shrinks the next at once


async def test_other_store_calls_run_between_two_batches(store):
    """SQLite: a batch holds the store's only thread; PostgreSQL's pool has other connections meanwhile."""
    _, kept = await seed(store, expired=6, recent=1)
    batches_seen: list[int] = []
    read_after: list[int] = []
    reads: list[asyncio.Task[object]] = []

    async def read() -> None:
        await store.get_audit(kept[0])
        read_after.append(len(batches_seen))

    def on_batch(batch: object) -> None:
        batches_seen.append(1)
        if len(batches_seen) == 1:
            reads.append(asyncio.create_task(read()))

    report = await retention.purge(store, time.time() - 90 * DAY, target=0.0, on_batch=on_batch)
    await asyncio.gather(*reads)
    assert report.batches >= 6
    assert read_after == [1]  # answered right after the first batch, not after the whole purge


async def test_a_schema_6_database_gets_the_purge_indexes(tmp_path):
    path = str(tmp_path / "v6.db")
    store = Store(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    for name in ("audits_created", "audits_previous", "verifications_expires"):
        conn.execute(f"DROP INDEX {name}")
    conn.execute("ALTER TABLE audits DROP COLUMN owner")  # schema 8's, which a schema 6 database lacks
    conn.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.schema_version() == SCHEMA_VERSION == 9
    await store.close()
    names = {row[0] for row in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"audits_created", "audits_previous", "verifications_expires"} <= names


async def test_the_purge_statements_use_indexes(store):
    """EXPLAIN QUERY PLAN of what a batch runs, and of what its deletes run for each audit (the cascades to the
    children, the FOREIGN KEY check of re-tests pointing at it): searches, never a scan."""
    conn = sqlite3.connect(store.path)
    statements = [
        "SELECT id FROM audits WHERE created_at < ? AND status NOT IN ('queued','running') LIMIT ?",
        "UPDATE audits SET previous_id=NULL WHERE previous_id IN (?,?)",
        "SELECT 1 FROM audits WHERE previous_id=?",
        "DELETE FROM audits WHERE id IN (?,?)",
        "DELETE FROM checks WHERE audit_id=?", "DELETE FROM openings WHERE audit_id=?",
        "DELETE FROM audit_addresses WHERE audit_id=?",
        "DELETE FROM verifications WHERE rowid IN (SELECT rowid FROM verifications WHERE expires_at < ? LIMIT ?)",
    ]
    for statement in statements:
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}",
                                                         (1,) * statement.count("?")))
        assert "SCAN" not in plan and ("INDEX" in plan or "PRIMARY KEY" in plan), (statement, plan)
    conn.close()


@pytest.mark.both_stores
async def test_the_periodic_purge_keeps_going_after_a_failed_batch(store, monkeypatch):
    old, kept = await seed(store, expired=3, recent=1)
    real = store.purge_batch
    calls: list[int] = []

    async def flaky(cutoff: float, limit: int, budget: float) -> retention.PurgeBatch:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return await real(cutoff, limit, budget)

    monkeypatch.setattr(store, "purge_batch", flaky)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("secure.retention")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    task = asyncio.create_task(retention.keep_purging(store, days=90, every=0.01))
    try:
        for _ in range(500):  # bounded: 5 s
            if any(record.getMessage() == "audits.purged" for record in records):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert all([await store.get_audit(audit_id) is None for audit_id in old])
    assert await store.get_audit(kept[0]) is not None
    events = [record.getMessage() for record in records]
    assert events[0] == "audits.purge_failed" and "audits.purged" in events


async def test_the_site_answers_healthz_while_a_purge_is_in_progress(settings, monkeypatch):
    """The purge starts beside the site, not before it: the first batch is done and the next one held back, and
    /healthz answers; released, the purge finishes."""
    store = Store(settings.sqlite_path)
    await store.open()
    old, kept = await seed(store, expired=20, recent=1)
    await store.close()
    first_done, release = asyncio.Event(), asyncio.Event()
    real = Store.purge_batch

    async def gated(self: Store, cutoff: float, limit: int, budget: float) -> retention.PurgeBatch:
        if first_done.is_set():
            await release.wait()
        batch = await real(self, cutoff, limit, budget)
        first_done.set()
        return batch

    monkeypatch.setattr(Store, "purge_batch", gated)
    assert retention.LIMIT_START < 20
    cutoff = time.time() - 90 * DAY
    async with contextlib.AsyncExitStack() as stack:
        # bounded: a start-up that waited for the purge would never end (the purge waits for `release`)
        client = await asyncio.wait_for(stack.enter_async_context(running_app(settings)), 10)
        await asyncio.wait_for(first_done.wait(), 10)
        response = await asyncio.wait_for(client.get("/healthz"), 10)
        assert response.status_code == 200
        left = count(settings.sqlite_path, f"SELECT COUNT(*) FROM audits WHERE created_at < {cutoff}")
        assert 0 < left < 20  # in progress: some gone, some not yet
        assert (await client.get(f"/api/v1/audits/{kept[0]}")).status_code == 200
        release.set()
        for _ in range(500):  # bounded: 5 s
            if count(settings.sqlite_path, "SELECT COUNT(*) FROM audits") == 1:
                break
            await asyncio.sleep(0.01)
        assert count(settings.sqlite_path, "SELECT COUNT(*) FROM audits") == 1
        assert (await client.get(f"/api/v1/audits/{old[0]}")).status_code == 404


@pytest.mark.both_stores
@pytest.mark.parametrize("target", [0.0, retention.HOLD_TARGET])
async def test_a_purge_of_nothing_is_one_batch(store, target):
    report = await retention.purge(store, time.time() - 90 * DAY, target=target)
    assert (report.audits, report.verifications, report.batches) == (0, 0, 1)
