"""The store on SQLite and on PostgreSQL: the tests marked both_stores run on each (tests/conftest.py gives each
PostgreSQL test a fresh database of the session's cluster); the SQLite file's own (WAL, its old schemas) on SQLite."""

import asyncio
import sqlite3
import time

import pytest

from app import ENGINE_VERSION, retention
from app.store import SCHEMA_VERSION, Audit, Store, new_id
from app.verdicts import CheckResult, TranscriptLine, Verdict

both_stores = pytest.mark.both_stores


def make_audit(**kw) -> Audit:
    values = dict(id=new_id(), created_at=time.time(), status="queued", target="self", requester="192.0.2.7",
                  hosts=["192.0.2.7"], services=["relay", "proxy"], planned=2, engine_version=ENGINE_VERSION)
    values.update(kw)
    return Audit(**values)


def test_ids_are_random_urlsafe_128_bits():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in ids:
        assert len(value) == 22 and all(c.isalnum() or c in "-_" for c in value)


@both_stores
async def test_schema_and_round_trip(store):
    assert await store.schema_version() == SCHEMA_VERSION
    audit = make_audit(created_at=1796051411.7842212)  # to the microsecond: PostgreSQL's REAL would keep 7 digits
    await store.create_audit(audit, ["192.0.2.7"])
    result = CheckResult("relay", "192.0.2.7", 25, "relay.reachable", Verdict.UNREACHABLE, "refused",
                         transcript=[TranscriptLine(0.0, "info", "connecting"), TranscriptLine(0.01, "in", "\\x00")],
                         fingerprint={"product": "Postfix", "version": None, "raw": "220 mx ESMTP Postfix"})
    finished_at = await store.add_check(audit.id, 1, result)
    await store.finish_audit(audit.id, "done", {"relay": "unreachable", "proxy": None})
    loaded = await store.get_audit(audit.id)
    assert loaded.status == "done" and loaded.engine_version == ENGINE_VERSION
    assert loaded.created_at == audit.created_at and loaded.checks[0].finished_at == finished_at
    assert loaded.summary == {"relay": "unreachable", "proxy": None}
    assert loaded.checks[0].result == result
    assert await store.addresses_of(audit.id) == ["192.0.2.7"]
    shown = await store.get_audit_shown(audit.id, "some-key")  # stored without a deriver: comes whole
    assert shown.checks[0].result == result
    verification = new_id()
    await store.create_verification(verification, "example.com", "token", "192.0.2.7", time.time() + 60)
    await store.mark_verified(verification, "dns")
    assert (await store.get_verification(verification))["method"] == "dns"


async def test_schema_wal_and_round_trip(tmp_path):
    path = str(tmp_path / "db.sqlite")
    store = Store(path)
    await store.open()
    assert await store.schema_version() == SCHEMA_VERSION
    audit = make_audit()
    await store.create_audit(audit)
    result = CheckResult("relay", "192.0.2.7", 25, "relay.reachable", Verdict.UNREACHABLE, "refused",
                         transcript=[TranscriptLine(0.0, "info", "connecting"), TranscriptLine(0.01, "in", "\\x00")],
                         fingerprint={"product": "Postfix", "version": None, "raw": "220 mx ESMTP Postfix"})
    await store.add_check(audit.id, 1, result)
    await store.finish_audit(audit.id, "done", {"relay": "unreachable", "proxy": None})
    loaded = await store.get_audit(audit.id)
    assert loaded.status == "done" and loaded.engine_version == ENGINE_VERSION
    assert loaded.summary == {"relay": "unreachable", "proxy": None}
    assert loaded.checks[0].result == result
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def set_last_seen(store: Store, instance: str, last_seen: float) -> None:
    await store._run(lambda c: c.execute("UPDATE instances SET last_seen=? WHERE id=?", (last_seen, instance)))


async def instances(store: Store, since: float = 0.0) -> list[str]:
    return await store._run(lambda c: [r[0] for r in c.execute("SELECT id FROM instances WHERE last_seen >= ?"
                                                               " ORDER BY id", (since,))])


@both_stores
async def test_unfinished_audits_of_gone_instances_become_interrupted_and_keep_their_checks(store):
    """Issue 16, item 5: only the audits whose instance stopped beating (or never had a row, or no owner: made
    before schema 8) are interrupted; a live instance's queued and running audits are never touched."""
    for instance in ("live", "gone"):
        await store.beat(instance)
    await set_last_seen(store, "gone", time.time() - 31)
    live_running, live_queued, gone_running, gone_queued, unknown, ownerless, done = (
        make_audit(owner="live"), make_audit(owner="live"), make_audit(owner="gone"), make_audit(owner="gone"),
        make_audit(owner="never-beat"), make_audit(owner=None), make_audit(owner="gone"))
    for audit in (live_running, live_queued, gone_running, gone_queued, unknown, ownerless, done):
        await store.create_audit(audit)
    for audit in (live_running, gone_running):
        await store.mark_running(audit.id)
    await store.add_check(gone_running.id, 1, CheckResult("proxy", "192.0.2.7", 80, "proxy.reachable",
                                                          Verdict.INCONCLUSIVE, "port_open"))
    await store.finish_audit(done.id, "done", {"relay": "closed", "proxy": "closed"})
    assert await store.interrupt_orphaned(30) == 4
    statuses = {a.id: (await store.get_audit(a.id)).status
                for a in (live_running, live_queued, gone_running, gone_queued, unknown, ownerless, done)}
    assert statuses == {live_running.id: "running", live_queued.id: "queued", gone_running.id: "interrupted",
                        gone_queued.id: "interrupted", unknown.id: "interrupted", ownerless.id: "interrupted",
                        done.id: "done"}
    interrupted = await store.get_audit(gone_running.id)
    assert len(interrupted.checks) == 1 and "restarted" in interrupted.error
    assert (await store.get_audit(live_running.id)).owner == "live"
    assert await instances(store) == ["live"]  # the gone instance's row went with its audits
    assert await store.interrupt_orphaned(30) == 0  # nothing more: the live instance's audits stay as they are


@both_stores
async def test_a_live_instance_is_never_taken_for_gone_and_a_beat_brings_a_removed_row_back(store):
    await store.beat("slow")
    await set_last_seen(store, "slow", time.time() - 29)  # within the bound: alive
    audit = make_audit(owner="slow", status="running")
    await store.create_audit(audit)
    assert await store.interrupt_orphaned(30) == 0
    await set_last_seen(store, "slow", time.time() - 3600)
    assert await store.interrupt_orphaned(30) == 1
    await store.beat("slow")  # it was only paused: its row is back (its audit stays interrupted)
    assert await instances(store, since=time.time() - 10) == ["slow"]


@both_stores
async def test_a_clean_stop_interrupts_only_the_instances_own_audits(store):
    for instance in ("a", "b"):
        await store.beat(instance)
    mine, queued, theirs = make_audit(owner="a", status="running"), make_audit(owner="a"), make_audit(owner="b")
    for audit in (mine, queued, theirs):
        await store.create_audit(audit)
    assert await store.leave("a") == 2
    assert [(await store.get_audit(a.id)).status for a in (mine, queued, theirs)] == ["interrupted"] * 2 + ["queued"]
    assert "shut down" in (await store.get_audit(mine.id)).error
    assert await store.interrupt_orphaned(30) == 0  # b is alive; a's row is gone with a


async def test_a_schema_7_database_gets_owners_and_instances(tmp_path):
    path = str(tmp_path / "v7.db")
    store = Store(path)
    await store.open()
    old = make_audit(status="running")
    await store.create_audit(old)
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE instances")
    conn.execute("ALTER TABLE audits DROP COLUMN owner")
    conn.execute("ALTER TABLE checks DROP COLUMN data")  # schema 10's
    conn.execute("DROP TABLE blocklist_answers")
    conn.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.schema_version() == SCHEMA_VERSION == 10
    assert (await store.get_audit(old.id)).owner is None
    await store.beat("new")
    assert await store.interrupt_orphaned(30) == 1  # an audit from before owners: nobody runs it now
    await store.close()


@both_stores
async def test_secret_is_made_once(store, store_location):
    first = await store.secret()
    assert len(first) >= 40 and await store.secret() == first
    other = Store(store_location)  # another process on the same database
    await other.open()
    assert await other.secret() == first
    await other.close()


@both_stores
async def test_retest_chain_and_purge(store):
    old = make_audit(created_at=time.time() - 1000, status="done")
    new = make_audit(previous_id=old.id, status="done")
    await store.create_audit(old)
    await store.create_audit(new)
    assert [a.id for a in await store.retest_chain(new.id)] == [new.id, old.id]
    assert (await retention.purge(store, time.time() - 500)).audits == 1
    assert await store.get_audit(old.id) is None
    assert (await store.get_audit(new.id)).previous_id is None


@both_stores
async def test_observations_are_shared_bounded_and_forgotten_after_a_time(store_location, monkeypatch):
    """What the listeners process saw (schema 9), read by another connection as another process would."""
    from app import store as store_module

    writer, reader = Store(store_location), Store(store_location)
    await writer.open()
    await reader.open()
    await writer.record_observation("sink", "sys0123456789abcdef")
    await writer.record_observation("canary", "cid0123456789abcdef", "192.0.2.1", "smtp")
    await writer.record_observation("canary", "cid0123456789abcdef", "192.0.2.1", "smtp")  # again: one row
    for n in range(store_module.MAX_SOURCES + 5):
        await writer.record_observation("canary", "cid00000000000000ff", f"198.51.100.{n}", "http")
    assert await reader.observed("sink", ["sys0123456789abcdef", "sys0000000000000000"]) == {
        "sys0123456789abcdef": [""]}
    assert await reader.observed("canary", ["cid0123456789abcdef"]) == {"cid0123456789abcdef": ["192.0.2.1"]}
    assert len((await reader.observed("canary", ["cid00000000000000ff"]))["cid00000000000000ff"]) == 20
    assert await reader.observed("sink", ["cid0123456789abcdef"]) == {}  # kinds stay apart
    # an hour later, the next record purges what is older than OBSERVATION_SECONDS
    real = time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: real + store_module.OBSERVATION_SECONDS + 1)
    await writer.record_observation("sink", "sys1111111111111111")
    assert await reader.observed("sink", ["sys0123456789abcdef", "sys1111111111111111"]) == {
        "sys1111111111111111": [""]}
    assert await reader.observed("canary", ["cid0123456789abcdef"]) == {}
    await writer.close()
    await reader.close()


@both_stores
async def test_observations_keep_at_most_the_newest_rows(store, monkeypatch):
    from app import store as store_module

    monkeypatch.setattr(store_module, "MAX_OBSERVATIONS", 5)
    monkeypatch.setattr(store_module, "TRIM_EVERY", 4)  # the 1st, 5th, 9th... record trims
    store._observations = 0
    tags = [f"sys{n:016x}" for n in range(9)]
    for tag in tags[:8]:
        await store.record_observation("sink", tag)
    assert sorted(await store.observed("sink", tags)) == tags[:8]  # the 5th trimmed nothing yet (5 rows)
    await store.record_observation("sink", tags[8])  # the 9th trims: the newest 5
    assert sorted(await store.observed("sink", tags)) == tags[4:]


async def test_a_schema_8_database_gets_the_observations_table(tmp_path):
    path = str(tmp_path / "v8.db")
    store = Store(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE observations")
    conn.execute("ALTER TABLE checks DROP COLUMN data")  # schema 10's
    conn.execute("DROP TABLE blocklist_answers")
    conn.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.schema_version() == 10
    await store.record_observation("sink", "sys0123456789abcdef")
    assert await store.observed("sink", ["sys0123456789abcdef"]) == {"sys0123456789abcdef": [""]}
    await store.close()


async def test_a_schema_9_database_gets_row_data_and_the_blocklist_cache(tmp_path):
    from app.verdicts import CheckResult, Verdict

    path = str(tmp_path / "v9.db")
    store = Store(path)
    await store.open()
    old = make_audit()
    await store.create_audit(old)
    await store.add_check(old.id, 1, CheckResult("relay", "192.0.2.1", 25, "relay.v1", Verdict.CLOSED,
                                                 "relay_denied"))
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE checks DROP COLUMN data")
    conn.execute("DROP TABLE blocklist_answers")
    conn.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.schema_version() == 10
    assert (await store.get_audit(old.id)).checks[0].result.data is None  # an older row has no data
    await store.add_check(old.id, 2, CheckResult("blocklist", "192.0.2.1", 0, "blocklist.psbl", Verdict.NOT_LISTED,
                                                 "not_listed", data={"codes": [], "txt": []}))
    assert (await store.get_audit(old.id)).checks[1].result.data == {"codes": [], "txt": []}
    await store.remember_blocklist_answers("192.0.2.1", [("psbl", '{"status": "not_listed"}')], keep=900)
    assert list(await store.blocklist_answers("192.0.2.1", 0)) == ["psbl"]
    await store.close()


# --- several processes on one database ------------------------------------------------------------------------
@both_stores
async def test_stores_opening_a_new_database_together_all_find_the_current_schema(store_location):
    """Processes starting at once on an empty database: one makes the schema (PostgreSQL: under an advisory lock;
    without it, concurrent CREATE TABLE IF NOT EXISTS fail), the others wait and find it current."""
    stores = [Store(store_location) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    assert [await store.schema_version() for store in stores] == [SCHEMA_VERSION] * 4
    await asyncio.gather(*(store.close() for store in stores))


@both_stores
async def test_a_newer_schema_is_refused(store, store_location):
    await store._run(lambda c: c.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                                         (str(SCHEMA_VERSION + 1),)))
    newer = Store(store_location)
    with pytest.raises(RuntimeError, match="newer than this code"):
        await newer.open()
    await newer.close()


@both_stores
async def test_concurrent_admissions_through_two_connections_hold_three_per_hour_exactly(store, store_location):
    """20 requests of one requester at once, through two Stores (two connections or pools, as two processes
    have): `3 per hour` admits exactly 3. Each decision is slow (50 ms), so admissions that overlapped would all
    count the same audits and admit far more (break the admission lock and see)."""
    import functools

    from app.admission import Limits, decide

    limits = Limits(cooldown=0, audits_per_target_per_hour=100, max_running_per_requester=100, audits_per_hour=3,
                    max_queued=1000)

    def slow_decide(facts):
        time.sleep(0.05)
        return decide(facts, limits, target="self", hosts=["192.0.2.7"], services=["relay"], retest=False)

    other = Store(store_location, pool_size=10)
    await other.open()
    try:
        wide = Store(store_location, pool_size=10)
        await wide.open()
        stores = [wide, other]
        outcomes = await asyncio.gather(*(
            stores[n % 2].admit(make_audit(), ["192.0.2.7"], 0, functools.partial(slow_decide))
            for n in range(20)))
        await wide.close()
    finally:
        await other.close()
    assert sorted(d.outcome for d in outcomes).count("create") == 3
    assert {d.code for d in outcomes if d.outcome != "create"} == {"requester_hourly"}
    assert await store._run(lambda c: c.execute("SELECT COUNT(*) FROM audits").fetchone()[0]) == 3


async def wait_for(condition, seconds: float = 5.0) -> float:
    """Seconds until condition() holds (bounded: AssertionError after `seconds`)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@both_stores
async def test_a_watched_audit_changed_by_another_process_wakes_this_one_within_a_second(store, store_location):
    """Live progress across processes: `other` stores rows of an audit that `store` watches; each write reaches
    store.on_change within a second (PostgreSQL: NOTIFY on commit, LISTEN; SQLite: data_version polled every
    0.25 s). Its own writes and unwatched audits are not reported (break the NOTIFY and see this fail)."""
    other = Store(store_location)
    await other.open()
    try:
        changes: list[str] = []
        store.on_change = changes.append
        watched, unwatched = make_audit(), make_audit()
        for audit in (watched, unwatched):
            await other.create_audit(audit)
        await store.watch(watched.id)
        await store.add_check(watched.id, 1, CheckResult("proxy", "192.0.2.7", 80, "proxy.a", Verdict.CLOSED,
                                                          "refused"))  # our own write: our followers know already
        await other.add_check(unwatched.id, 1, CheckResult("proxy", "192.0.2.7", 80, "proxy.a", Verdict.CLOSED,
                                                            "refused"))
        if store.postgres:  # PostgreSQL tells which audit changed: nothing for these two
            await asyncio.sleep(0.3)
            assert changes == []
        changes.clear()
        writes = [
            other.add_check(watched.id, 2, CheckResult("proxy", "192.0.2.7", 81, "proxy.b", Verdict.CLOSED, "refused")),
            other.update_check(watched.id, 2, CheckResult("proxy", "192.0.2.7", 81, "proxy.b", Verdict.OPEN,
                                                          "token_returned")),
            other.finish_audit(watched.id, "done", {"relay": None, "proxy": "open"})]
        for write in writes:
            await write
            assert await wait_for(lambda: watched.id in changes) < 1.0
            changes.clear()
        store.unwatch(watched.id)
        await other.set_summary(watched.id, {"relay": None, "proxy": "closed"})
        await asyncio.sleep(0.5)
        assert changes == []  # no longer watched
    finally:
        await other.close()


async def test_a_lost_listen_connection_is_made_again_and_wakes_the_followers(postgres_server):
    """PostgreSQL: the LISTEN session killed (a restart, a proxy's idle timeout), the store listens again within
    about a second, wakes every watched audit once (what was sent meanwhile is lost) and hears later writes."""
    import psycopg

    location = postgres_server.new_database()
    store, other = Store(location), Store(location)
    await store.open()
    await other.open()
    try:
        changes: list[str] = []
        store.on_change = changes.append
        audit = make_audit()
        await other.create_audit(audit)
        await store.watch(audit.id)
        with psycopg.connect(postgres_server.admin_dsn, autocommit=True) as admin:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                   " WHERE query LIKE 'LISTEN%%' AND datname=%s",
                                   (location.rsplit("/", 1)[1],)).fetchone()[0]
        assert killed == 1
        await wait_for(lambda: audit.id in changes, 5.0)
        changes.clear()
        await other.add_check(audit.id, 1, CheckResult("proxy", "192.0.2.7", 80, "proxy.a", Verdict.CLOSED,
                                                        "refused"))
        assert await wait_for(lambda: audit.id in changes) < 1.0
    finally:
        await other.close()
        await store.close()


async def test_pooled_connections_killed_by_a_restart_are_replaced_before_use(postgres_server):
    """PostgreSQL: every pooled session ended under the store (a database restart, a failover, a proxy's idle
    timeout); the next calls get fresh connections instead of an error for each dead one the pool hands out."""
    location = postgres_server.new_database()
    store = Store(location, pool_size=3)
    await store.open()
    try:
        audit = make_audit()
        await store.create_audit(audit)
        assert postgres_server.end_sessions(location) == 3
        for _ in range(6):  # more calls than pooled connections: each dead one would fail one call
            found = await store.get_audit(audit.id)
            assert found is not None and found.id == audit.id
    finally:
        await store.close()


@both_stores
async def test_a_later_migration_runs_on_both_stores_with_their_own_types(store_location, monkeypatch):
    """A migration after FIRST_POSTGRES_SCHEMA is written once, in `?` SQL: a REAL column it adds is 8 bytes on
    PostgreSQL too (DOUBLE PRECISION), so a timestamp keeps its microseconds."""
    from app import store as store_module

    store = Store(store_location)
    await store.open()
    audit = make_audit()
    await store.create_audit(audit)
    await store.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module._MIGRATIONS, SCHEMA_VERSION + 1, [
        "ALTER TABLE audits ADD COLUMN reviewed_at REAL", "UPDATE audits SET reviewed_at=1796051411.7842212"])
    newer = Store(store_location)
    await newer.open()
    try:
        assert await newer.schema_version() == SCHEMA_VERSION + 1
        value = await newer._run(lambda c: c.execute("SELECT reviewed_at FROM audits WHERE id=?",
                                                     (audit.id,)).fetchone()[0])
        assert value == 1796051411.7842212
    finally:
        await newer.close()


@both_stores
async def test_a_rows_data_and_the_blocklist_answers_round_trip(store):
    audit = make_audit()
    await store.create_audit(audit, ["192.0.2.7"])
    data = {"codes": ["127.0.0.4"], "txt": ["see https://example.test"], "removal_url": "https://example.test/",
            "cached_at": None}
    await store.add_check(audit.id, 1, CheckResult("blocklist", "192.0.2.7", 0, "blocklist.spamhaus-zen",
                                                   Verdict.LISTED, "listed_exploited", data=data))
    assert (await store.get_audit(audit.id)).checks[0].result.data == data
    assert (await store.get_audit(audit.id, transcripts=False)).checks[0].result.data == data
    assert (await store.get_audit_shown(audit.id, "key")).checks[0].result.data == data
    await store.remember_blocklist_answers("192.0.2.7", [("spamhaus-zen", "A"), ("psbl", "B")], keep=900)
    await store.remember_blocklist_answers("192.0.2.7", [("spamhaus-zen", "C")], keep=900)  # replaces the answer
    found = await store.blocklist_answers("192.0.2.7", time.time() - 900)
    assert {k: v[0] for k, v in found.items()} == {"spamhaus-zen": "C", "psbl": "B"}
    assert await store.blocklist_answers("192.0.2.8", 0) == {}
    await store.remember_blocklist_answers("192.0.2.9", [("psbl", "D")], keep=0)  # keep 0: the older ones go
    assert await store.blocklist_answers("192.0.2.7", 0) == {}
