"""Startup never disturbs other instances (issue 16, item 5): real `serve` processes on one SQLite file.

Each instance owns the audits it creates (audits.owner) and renews its heartbeat (a row in `instances`) every sixth
of SECURE_INSTANCE_STALE_SECONDS. Recovery, at start and once per bound, interrupts only the unfinished audits whose
owner stopped beating; a clean stop interrupts only the stopping instance's own. The audits here test a slow target
(HeldPort: it accepts and says nothing until the test releases it), so they are `running` for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import ServedSite, wait_done_sync

from app import audits
from app.audits import Auditor
from app.store import new_id

STALE = 1.5  # SECURE_INSTANCE_STALE_SECONDS for these tests: a beat every 0.25 s, a sweep every 1.5 s
WAIT = 60.0  # the generous bound on anything that must happen "after the staleness bound"


class HeldPort:
    """A slow SMTP server on loopback: accepts connections and sends nothing (the probe waits for a greeting) until
    release(); from then on it closes every connection, held or new. Its thread stops with stop() (or after 300 s)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._released = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="held-port", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stopped.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn, _ = self._server.accept()
                self.accepted += 1
                self._held.append(conn)
            if self._released.is_set():
                for conn in self._held:
                    conn.close()
                self._held.clear()
        for conn in self._held:
            conn.close()
        self._server.close()

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


@pytest.fixture
def held() -> Iterator[HeldPort]:
    port = HeldPort()
    yield port
    port.stop()


def env_for(held: HeldPort, db: Path) -> dict[str, str]:
    return {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(held.port), "SECURE_PROXY_PORTS": "",
            "SECURE_CONNECT_TIMEOUT": "5", "SECURE_SMTP_COMMAND_TIMEOUT": "120", "SECURE_TARGET_COOLDOWN": "0",
            "SECURE_MAX_RUNNING_PER_REQUESTER": "10", "SECURE_LOG_LEVEL": "WARNING",
            "SECURE_INSTANCE_STALE_SECONDS": str(STALE), "SECURE_DATABASE_URL": f"sqlite:///{db}"}


def instance(tmp_path: Path, name: str, env: dict[str, str]) -> ServedSite:
    folder = tmp_path / name
    folder.mkdir()
    return ServedSite(folder, env)


def status(site: ServedSite, audit_id: str) -> str:
    return str(httpx.get(f"{site.url}/api/v1/audits/{audit_id}", timeout=5).json()["status"])


def running_audit(site: ServedSite, held: HeldPort) -> str:
    """An audit started on `site`, once it is `running` with a connection held by the slow target (bounded)."""
    before = held.accepted
    response = httpx.post(site.url + "/api/v1/audits/self", timeout=5)
    assert response.status_code == 202, response.text
    audit_id = str(response.json()["id"])
    deadline = time.monotonic() + 20
    while not (status(site, audit_id) == "running" and held.accepted > before):
        assert time.monotonic() < deadline, "the audit did not start"
        time.sleep(0.05)
    return audit_id


def row(db: Path, audit_id: str) -> sqlite3.Row:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM audits WHERE id=?", (audit_id,)).fetchone()


def instances(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM instances")}


def add_orphan(db: Path) -> str:
    """A running audit whose instance stopped beating an hour ago: the next sweep's to interrupt."""
    now, audit_id = time.time(), new_id()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO instances(id, started_at, last_seen) VALUES ('gone', ?, ?)", (now - 3600, now - 3600))
        conn.execute("INSERT INTO audits(id, created_at, status, target, requester, hosts, services, planned,"
                     " engine_version, owner) VALUES (?, ?, 'running', 'self', '192.0.2.9', '[\"192.0.2.9\"]',"
                     " '[\"relay\"]', 0, 'test', 'gone')", (audit_id, now))
    return audit_id


def wait_until_finished(site: ServedSite, audit_id: str) -> tuple[dict, float]:
    started = time.monotonic()
    return wait_done_sync(site.url, audit_id, seconds=WAIT), time.monotonic() - started


class Beats:
    """A store that records what the heartbeat asks of it; its `fail`th call fails as a locked database does."""

    def __init__(self, fail: int) -> None:
        self.calls: list[object] = []
        self.fail = fail

    async def beat(self, instance_id: str) -> None:
        self.calls.append("beat")
        if len(self.calls) == self.fail:
            raise sqlite3.OperationalError("database is locked")

    async def interrupt_orphaned(self, stale: float) -> int:
        self.calls.append(("sweep", stale))
        return 0


async def test_the_heartbeat_beats_every_sixth_of_the_bound_sweeps_once_per_bound_and_outlives_a_failure(
        settings, monkeypatch):
    """No clock: asyncio.sleep is replaced by one that records the interval and ends the task at the 13th."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        if len(slept) == 12:
            raise asyncio.CancelledError
        slept.append(seconds)

    monkeypatch.setattr(audits.asyncio, "sleep", sleep)
    store = Beats(fail=3)
    auditor = Auditor(settings.model_copy(update={"instance_stale_seconds": 12.0}), store)
    with pytest.raises(asyncio.CancelledError):
        await auditor.keep_alive()
    assert slept == [2.0] * 12
    sweep = ["beat", ("sweep", 12.0)]  # a sweep beats first: its own instance is never taken for gone
    assert store.calls == ["beat"] * 5 + sweep + ["beat"] * 5 + sweep  # the failed third beat did not end it


def test_a_starting_instance_leaves_a_live_instances_audit_running_and_it_ends_done(tmp_path, held):
    db = tmp_path / "site.db"
    env = env_for(held, db)
    with instance(tmp_path, "a", env) as a:
        audit_id = running_audit(a, held)
        owner = row(db, audit_id)["owner"]
        assert owner in instances(db)
        with instance(tmp_path, "b", env) as b:  # B's start-up recovery ran before it answered /healthz
            assert (status(a, audit_id), status(b, audit_id)) == ("running", "running")
            # a sweep after B started (seen when it takes a planted orphan): A beats, so its audit is not one
            orphan = add_orphan(db)
            data, _ = wait_until_finished(b, orphan)
            assert data["status"] == "interrupted"
            assert status(b, audit_id) == "running" and row(db, audit_id)["error"] is None
            assert "gone" not in instances(db) and owner in instances(db)
            held.release()
            data, _ = wait_until_finished(b, audit_id)
        assert data["status"] == "done" and data["error"] is None
        assert len(data["checks"]) == data["planned"] > 0  # every planned check filled, by A
        assert row(db, audit_id)["owner"] == owner
    assert "audits.interrupted_at_start" not in (tmp_path / "b" / "site.log").read_text()


def test_kill_9_of_an_instance_interrupts_its_audit_after_the_bound_and_only_its_own(tmp_path, held):
    db = tmp_path / "site.db"
    env = env_for(held, db)
    a = instance(tmp_path, "a", env)
    try:
        with instance(tmp_path, "b", env) as b:
            on_a = running_audit(a, held)
            on_b = running_audit(b, held)
            a_owner = row(db, on_a)["owner"]
            a.stop(kill=True)
            assert a.process.returncode == -9
            assert row(db, on_a)["status"] == "running"  # nothing marked it: a kill -9 says nothing
            data, waited = wait_until_finished(b, on_a)  # B's sweep, once A's heartbeat is older than the bound
            assert data["status"] == "interrupted" and "restarted" in data["error"]
            assert waited < WAIT
            assert a_owner not in instances(db)
            assert status(b, on_b) == "running"  # B's own audit: its instance is alive
            held.release()
            data, _ = wait_until_finished(b, on_b)
            assert data["status"] == "done" and len(data["checks"]) == data["planned"] > 0
    finally:
        a.stop(kill=True)


def test_a_clean_stop_interrupts_the_instances_own_audits_and_no_others(tmp_path, held):
    db = tmp_path / "site.db"
    env = env_for(held, db)
    with instance(tmp_path, "b", env) as b:
        a = instance(tmp_path, "a", env)
        try:
            on_a = running_audit(a, held)
            on_b = running_audit(b, held)
            a_owner, b_owner = row(db, on_a)["owner"], row(db, on_b)["owner"]
            assert a_owner != b_owner
        finally:
            a.stop()
        assert a.process.returncode in (0, -15)  # SIGTERM: uvicorn shuts down (the lifespan ends), then exits
        stopped = row(db, on_a)
        assert (stopped["status"], stopped["error"]) == ("interrupted", "the site shut down")
        assert instances(db) == {b_owner}  # A left; B beats on
        assert row(db, on_b)["status"] == "running"
        held.release()
        data, _ = wait_until_finished(b, on_b)
        assert data["status"] == "done" and len(data["checks"]) == data["planned"] > 0
