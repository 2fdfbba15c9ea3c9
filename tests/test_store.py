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


async def test_unfinished_audits_become_interrupted_and_keep_their_checks(tmp_path):
    store = Store(str(tmp_path / "db.sqlite"))
    await store.open()
    running, queued, done = make_audit(), make_audit(), make_audit()
    for audit in (running, queued, done):
        await store.create_audit(audit)
    await store.mark_running(running.id)
    await store.add_check(running.id, 1, CheckResult("proxy", "192.0.2.7", 80, "proxy.reachable",
                                                     Verdict.INCONCLUSIVE, "port_open"))
    await store.finish_audit(done.id, "done", {"relay": "closed", "proxy": "closed"})
    assert await store.interrupt_unfinished() == 2
    assert (await store.get_audit(running.id)).status == "interrupted"
    assert (await store.get_audit(queued.id)).status == "interrupted"
    assert (await store.get_audit(done.id)).status == "done"
    assert len((await store.get_audit(running.id)).checks) == 1
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
