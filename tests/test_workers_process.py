"""The job queue with real processes (issue 16, items 3 and 5): two `serve` and two `worker` processes on one real
PostgreSQL and one real Redis, started by the tests on loopback. An audit started on one web process is run by a
worker; kill -9 of that worker -> the other one finishes it, `done`, every planned check, the rows stored before the
kill kept as they were; a third instance starting meanwhile never changes its status; 60 audits across the web
processes all end `done`, never more than SECURE_MAX_RUNNING_AUDITS running at once on the whole site.

The slow target is test_instances.HeldPort: it accepts and says nothing until released (an SMTP probe waits for a
greeting), so an audit runs for as long as a test needs; a refused port beside it gives rows that are stored at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from support import AuditWorker, ServedSite, wait_done_sync
from test_instances import HeldPort

STALE = 2.0  # SECURE_INSTANCE_STALE_SECONDS: the recovery sweep runs every 2 s, well inside a worker's stall
KILL_BOUND = 60.0  # kill -9 of a worker -> its audit `done` on another worker within this


@pytest.fixture
def held() -> Iterator[HeldPort]:
    port = HeldPort()
    yield port
    port.stop()


class SilentPorts:
    """One port on many loopback addresses (one self-audit target each) that accepts and says nothing: an SMTP
    probe waits for a greeting until its timeout. Connections are closed after `hold` s; the thread stops with stop()
    (or after 300 s)."""

    def __init__(self, addresses: list[str], hold: float = 30.0) -> None:
        self.hold = hold
        self._selector = selectors.DefaultSelector()
        for _ in range(20):  # a port free on the first address may be taken on another: try again
            self._listeners: list[socket.socket] = []
            try:
                self._listeners.append(socket.create_server((addresses[0], 0), backlog=64))
                self.port = self._listeners[0].getsockname()[1]
                self._listeners += [socket.create_server((a, self.port), backlog=64) for a in addresses[1:]]
                break
            except OSError:
                for listener in self._listeners:
                    listener.close()
        for listener in self._listeners:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ)
        self._held: list[tuple[float, socket.socket]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-ports", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stopped.is_set() and time.monotonic() < deadline:
            for key, _ in self._selector.select(timeout=0.05):
                with contextlib.suppress(OSError):
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    self._held.append((time.monotonic() + self.hold, conn))
            now = time.monotonic()
            for _, conn in (due := [h for h in self._held if h[0] <= now]):
                conn.close()
            self._held = [h for h in self._held if h not in due]
        for _, conn in self._held:
            conn.close()
        for listener in self._listeners:
            listener.close()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def site(tmp_path: Path, env: dict[str, str], webs: int = 2, workers: int = 2) -> Iterator[tuple[list, list]]:
    started: list[ServedSite | AuditWorker] = []
    try:
        web = [ServedSite(_folder(tmp_path, f"web{n}"), env) for n in range(webs)]
        started += web
        work = [AuditWorker(tmp_path / f"worker{n}", env) for n in range(workers)]
        started += work
        yield web, work
    finally:
        for process in reversed(started):
            process.stop()


def _folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


REDIS_DATABASES = itertools.count(1)  # one Redis database per test: a killed worker's leases (60 s) stay behind


def site_env(postgres_server, redis_server, held: HeldPort, refused_port: int, **more: str) -> dict[str, str]:
    redis_url = redis_server.url_for(next(REDIS_DATABASES) % 16)
    return {"SECURE_DATABASE_URL": postgres_server.new_database(), "SECURE_LIMITS_STORAGE": redis_url,
            "SECURE_LISTENERS": "external", "SECURE_SECRET_KEY": "test-secret-shared-by-every-process",
            "SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": f"{refused_port},{held.port}",
            "SECURE_PROXY_PORTS": "", "SECURE_CONNECT_TIMEOUT": "5", "SECURE_SMTP_COMMAND_TIMEOUT": "120",
            "SECURE_TARGET_COOLDOWN": "0", "SECURE_MAX_RUNNING_PER_REQUESTER": "10", "SECURE_AUDITS_PER_HOUR": "100",
            "SECURE_AUDITS_PER_TARGET_PER_HOUR": "100", "SECURE_INSTANCE_STALE_SECONDS": str(STALE),
            "SECURE_LOG_LEVEL": "INFO", **more}


def query(env: dict[str, str], sql: str, *args: object) -> list[tuple]:
    with psycopg.connect(env["SECURE_DATABASE_URL"]) as conn:
        return conn.execute(sql, args).fetchall()


def start_audit(web: ServedSite, address: str = "127.0.0.1") -> str:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=10) as client:
        response = client.post(web.url + "/api/v1/audits/self")
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def api(web: ServedSite, audit_id: str) -> dict:
    return httpx.get(f"{web.url}/api/v1/audits/{audit_id}", timeout=5).json()


@pytest.mark.parametrize("kill", [True, False], ids=["kill -9", "SIGTERM"])
def test_a_killed_workers_audit_is_finished_by_the_other_worker_keeping_every_stored_row(
        tmp_path, postgres_server, redis_server, held, refused_port, kill):
    """kill -9: the job is put back once the worker's heartbeat is 15 s old; SIGTERM: the worker hands it back
    itself after its 5 s of grace. Either way the other worker resumes it."""
    # the held port's checks end after 10 s on the worker that resumes them (the first one dies well before)
    env = site_env(postgres_server, redis_server, held, refused_port, SECURE_SMTP_PORT_DEADLINE="10")
    with site(tmp_path, env) as (web, workers):
        audit_id = start_audit(web[0])
        deadline = time.monotonic() + 30
        # running on a worker: the refused port's rows stored, the held port's connection waiting for a greeting
        while not (held.accepted and api(web[1], audit_id)["checks"]):
            assert time.monotonic() < deadline, "the audit did not start on a worker"
            time.sleep(0.1)
        data = api(web[1], audit_id)
        assert data["status"] == "running" and data["planned"] > len(data["checks"])
        owner = query(env, "SELECT owner FROM audits WHERE id = %s", audit_id)[0][0]
        running = next(w for w in workers if w.instance == owner)
        survivor = next(w for w in workers if w is not running)
        before = query(env, "SELECT seq, name, finished_at FROM checks WHERE audit_id = %s ORDER BY seq", audit_id)
        killed = time.monotonic()
        running.stop(kill=kill)
        # a third instance starting, and the recovery sweeps of every instance (each STALE s), while the job is
        # stalled: the audit stays `running`
        # (after SIGTERM the other worker may have finished it already: `done`)
        unchanged = {"running"} if kill else {"running", "done"}
        with ServedSite(_folder(tmp_path, "web3"), env) as third:
            assert api(third, audit_id)["status"] in unchanged
            time.sleep(3 * STALE)
            assert api(third, audit_id)["status"] in unchanged
        data = wait_done_sync(web[0].url, audit_id, seconds=KILL_BOUND)
        took = time.monotonic() - killed
    assert data["status"] == "done" and data["error"] is None, data
    assert took < KILL_BOUND
    assert len(data["checks"]) == data["planned"] > len(before) > 0  # every planned check, once
    rows = query(env, "SELECT seq, name, finished_at FROM checks WHERE audit_id = %s ORDER BY seq", audit_id)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))  # seq unique and gapless
    assert rows[:len(before)] == before  # the rows stored before the kill, kept as they were (not run again)
    assert len({(r[1], c["port"]) for r, c in zip(rows, data["checks"], strict=True)}) == len(rows)
    assert query(env, "SELECT owner FROM audits WHERE id = %s", audit_id)[0][0] == survivor.instance
    assert '"audit.resumed"' in survivor.log.read_text()
    assert "interrupted" not in (tmp_path / "web3" / "site.log").read_text()


def test_sixty_audits_across_two_web_processes_all_end_done_within_the_site_wide_cap(
        tmp_path, postgres_server, redis_server, held, refused_port):
    """Each audit is a requester of its own (127.0.0.10-69: `self` audits of 60 addresses) whose SMTP port says
    nothing: each audit waits 1 s for a greeting. Two workers of concurrency 3 (the default), a site-wide cap of 3."""
    addresses = [f"127.0.0.{10 + n}" for n in range(60)]
    silent = SilentPorts(addresses)
    env = site_env(postgres_server, redis_server, held, refused_port, SECURE_SMTP_COMMAND_TIMEOUT="1",
                   SECURE_SMTP_PORT_DEADLINE="3", SECURE_MAX_RUNNING_AUDITS="3",
                   SECURE_RELAY_PORTS=f"{refused_port},{silent.port}")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # the audits running on the whole site, every 20 ms
        with psycopg.connect(env["SECURE_DATABASE_URL"], autocommit=True) as conn:
            while not stop.is_set():
                samples.append(conn.execute("SELECT COUNT(*) FROM audits WHERE status = 'running'").fetchone()[0])
                time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        with site(tmp_path, env) as (web, _workers):
            sampler.start()
            ids = [start_audit(web[n % 2], address) for n, address in enumerate(addresses)]
            positions = [api(web[1], audit_id).get("queue_position") for audit_id in ids[-5:]]
            deadline = time.monotonic() + 180
            while query(env, "SELECT COUNT(*) FROM audits WHERE status = 'done'")[0][0] < 60:
                assert time.monotonic() < deadline, "not every audit ended within 180 s"
                time.sleep(0.2)
            final = [api(web[n % 2], audit_id) for n, audit_id in enumerate(ids)]
            ran_on = {owner for (owner,) in query(env, "SELECT DISTINCT owner FROM audits")}
    finally:
        stop.set()
        silent.stop()
    assert [d["status"] for d in final] == ["done"] * 60
    assert all(len(d["checks"]) == d["planned"] > 0 for d in final)
    assert max(samples) == 3  # audits ran side by side, never more than the site's cap (2 workers x 3 jobs)
    assert ran_on == {w.instance for w in _workers}  # both workers ran some
    assert any(isinstance(p, int) and p > 1 for p in positions)  # queued audits said where they stood


def test_a_serve_with_its_own_sink_confirms_the_relayed_probes_of_an_audit_a_worker_runs(
        tmp_path, postgres_server, postfix_ok):
    """One `serve` binding the sink itself (SECURE_LISTENERS=embedded) and one worker: the worker waits for the
    arrivals in the store, where that serve records them. A real open Postfix relays every probe to the sink."""
    from servers.postfix import start_postfix
    from support import free_port

    sink_port = free_port()
    env = {"SECURE_DATABASE_URL": postgres_server.new_database(), "SECURE_ALLOW_NETWORKS": "127.0.0.0/8",
           "SECURE_LOG_LEVEL": "INFO", "SECURE_TARGET_COOLDOWN": "0", "SECURE_PROXY_PORTS": "",
           "SECURE_SINK_LISTEN": f"127.0.0.1:{sink_port}", "SECURE_PROBE_DOMAIN": "sink.test.example",
           "SECURE_PROBE_HELO": "probe.test.example", "SECURE_SINK_WAIT": "10",
           "SECURE_SECRET_KEY": "test-secret-shared-by-every-process"}
    instance = start_postfix(tmp_path, "open", sink_port=sink_port)
    env["SECURE_RELAY_PORTS"] = str(instance.port)
    try:
        with ServedSite(_folder(tmp_path, "web"), env) as web, AuditWorker(tmp_path / "worker", env) as worker:
            response = httpx.post(web.url + "/api/v1/audits", json={"target": "self", "checks": ["relay"]}, timeout=5)
            audit_id = response.json()["id"]
            data = wait_done_sync(web.url, audit_id, seconds=90)
    finally:
        instance.stop()
    assert data["status"] == "done" and data["summary"] == {"relay": "open", "proxy": None, "blocklist": None}
    assert len(data["checks"]) == data["planned"] == 22
    assert {(c["reason"], c["confirmed"]) for c in data["checks"]} == {("delivered", True)}
    assert query(env, "SELECT owner FROM audits WHERE id = %s", audit_id)[0][0] == worker.instance
    assert "sink.started" in web.log.read_text() and "sink.started" not in worker.log.read_text()
    # the worker saw every arrival (through the store) before it summed the audit up: none waited out SINK_WAIT
    deliveries = [json.loads(line) for line in worker.log.read_text().splitlines() if '"audit.deliveries"' in line]
    assert [(d["expected"] + d["local"], d["arrived"]) for d in deliveries] == [(22, 22)]
