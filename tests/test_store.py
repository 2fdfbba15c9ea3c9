import sqlite3
import time

from app import ENGINE_VERSION, retention
from app.store import SCHEMA_VERSION, Audit, Store, new_id
from app.verdicts import CheckResult, TranscriptLine, Verdict


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


def set_last_seen(path: str, instance: str, last_seen: float) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE instances SET last_seen=? WHERE id=?", (last_seen, instance))


async def test_unfinished_audits_of_gone_instances_become_interrupted_and_keep_their_checks(tmp_path):
    """Issue 16, item 5: only the audits whose instance stopped beating (or never had a row, or no owner: made
    before schema 8) are interrupted; a live instance's queued and running audits are never touched."""
    path = str(tmp_path / "db.sqlite")
    store = Store(path)
    await store.open()
    for instance in ("live", "gone"):
        await store.beat(instance)
    set_last_seen(path, "gone", time.time() - 31)
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
    with sqlite3.connect(path) as conn:  # the gone instance's row went with its audits
        assert [r[0] for r in conn.execute("SELECT id FROM instances")] == ["live"]
    assert await store.interrupt_orphaned(30) == 0  # nothing more: the live instance's audits stay as they are
    await store.close()


async def test_a_live_instance_is_never_taken_for_gone_and_a_beat_brings_a_removed_row_back(tmp_path):
    path = str(tmp_path / "db.sqlite")
    store = Store(path)
    await store.open()
    await store.beat("slow")
    set_last_seen(path, "slow", time.time() - 29)  # within the bound: alive
    audit = make_audit(owner="slow", status="running")
    await store.create_audit(audit)
    assert await store.interrupt_orphaned(30) == 0
    set_last_seen(path, "slow", time.time() - 3600)
    assert await store.interrupt_orphaned(30) == 1
    await store.beat("slow")  # it was only paused: its row is back (its audit stays interrupted)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM instances WHERE id='slow' AND last_seen > ?",
                            (time.time() - 10,)).fetchone()[0] == 1
    await store.close()


async def test_a_clean_stop_interrupts_only_the_instances_own_audits(tmp_path):
    store = Store(str(tmp_path / "db.sqlite"))
    await store.open()
    for instance in ("a", "b"):
        await store.beat(instance)
    mine, queued, theirs = make_audit(owner="a", status="running"), make_audit(owner="a"), make_audit(owner="b")
    for audit in (mine, queued, theirs):
        await store.create_audit(audit)
    assert await store.leave("a") == 2
    assert [(await store.get_audit(a.id)).status for a in (mine, queued, theirs)] == ["interrupted"] * 2 + ["queued"]
    assert "shut down" in (await store.get_audit(mine.id)).error
    assert await store.interrupt_orphaned(30) == 0  # b is alive; a's row is gone with a
    await store.close()


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


async def test_secret_is_made_once(tmp_path):
    store = Store(str(tmp_path / "db.sqlite"))
    await store.open()
    first = await store.secret()
    assert len(first) >= 40 and await store.secret() == first
    await store.close()


async def test_retest_chain_and_purge(tmp_path):
    store = Store(str(tmp_path / "db.sqlite"))
    await store.open()
    old = make_audit(created_at=time.time() - 1000, status="done")
    new = make_audit(previous_id=old.id, status="done")
    await store.create_audit(old)
    await store.create_audit(new)
    assert [a.id for a in await store.retest_chain(new.id)] == [new.id, old.id]
    assert (await retention.purge(store, time.time() - 500)).audits == 1
    assert await store.get_audit(old.id) is None
    assert (await store.get_audit(new.id)).previous_id is None
    await store.close()


async def test_observations_are_shared_bounded_and_forgotten_after_a_time(tmp_path, monkeypatch):
    """What the listeners process saw (schema 9), read by another connection as another process would."""
    from app import store as store_module

    path = str(tmp_path / "db.sqlite")
    writer, reader = Store(path), Store(path)
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


async def test_observations_keep_at_most_the_newest_rows(tmp_path, monkeypatch):
    from app import store as store_module

    monkeypatch.setattr(store_module, "MAX_OBSERVATIONS", 5)
    monkeypatch.setattr(store_module, "TRIM_EVERY", 4)  # the 1st, 5th, 9th... record trims
    store = Store(str(tmp_path / "db.sqlite"))
    await store.open()
    tags = [f"sys{n:016x}" for n in range(9)]
    for tag in tags[:8]:
        await store.record_observation("sink", tag)
    assert sorted(await store.observed("sink", tags)) == tags[:8]  # the 5th trimmed nothing yet (5 rows)
    await store.record_observation("sink", tags[8])  # the 9th trims: the newest 5
    assert sorted(await store.observed("sink", tags)) == tags[4:]
    await store.close()


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
