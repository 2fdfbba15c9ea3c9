"""Live progress across instances (issue 16, item 4): two real `serve` processes on one database; an audit started
on A and followed on B (its event stream) reaches B's client within a second of each row being stored by A (on
PostgreSQL: by the worker process that runs A's audits).

On PostgreSQL A's writes send NOTIFY and B's LISTEN connection wakes its follower; on SQLite B polls the file's
data_version every 0.25 s while it follows an audit it does not run. Without either, B's follower would read the
store only every 15 s (its keep-alive) and at `done`. The audit's rows are spread over seconds: refused ports at
once, a port that drops SYNs at the connect timeout (2.5 s).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest
from support import AuditWorker, ServedSite, wait_done_sync

pytestmark = pytest.mark.both_stores

LIMIT = 1.0  # seconds between a row's finished_at (stored by A) and its arrival at B's event-stream client


class Follower:
    """An event-stream client on its own thread: the time each row (seq) first arrived, and when `done` did."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrived: dict[int, float] = {}
        self.done: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name="follower", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            buffer = ""
            with httpx.stream("GET", self.url, timeout=60) as response:
                for chunk in response.iter_text():
                    buffer += chunk
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        if self._event(block, time.time()):
                            return
        except Exception as exc:  # the test reads it
            self.error = exc

    def _event(self, block: str, now: float) -> bool:
        lines = block.split("\n")
        if lines[0] == "event: check":
            seq = json.loads(lines[1].removeprefix("data: "))["seq"]
            self.arrived.setdefault(seq, now)
        elif lines[0] == "event: done":
            self.done = now
            return True
        return False

    def join(self, seconds: float) -> None:
        self._thread.join(seconds)
        assert not self._thread.is_alive(), "the event stream did not end"
        assert self.error is None, self.error


def stored_rows(location: str, audit_id: str) -> dict[int, float]:
    """seq -> finished_at, as A stored them."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            rows = conn.execute("SELECT seq, finished_at FROM checks WHERE audit_id=%s", (audit_id,)).fetchall()
    else:
        import sqlite3

        with sqlite3.connect(location) as conn:
            rows = conn.execute("SELECT seq, finished_at FROM checks WHERE audit_id=?", (audit_id,)).fetchall()
    return {seq: finished_at for seq, finished_at in rows}


def test_an_audit_run_on_one_instance_is_followed_live_on_another(tmp_path, settings, refused_port, silent_port):
    location = settings.database_location
    env = {"SECURE_DATABASE_URL": settings.database_url, "SECURE_ALLOW_NETWORKS": "127.0.0.0/8",
           "SECURE_TARGET_COOLDOWN": "0", "SECURE_LOG_LEVEL": "WARNING", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": f"{refused_port},{silent_port}", "SECURE_CONNECT_TIMEOUT": "2.5"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    # on PostgreSQL the audits run in a worker process (app/jobs.py): the rows are stored there, followed on B
    worker = AuditWorker(tmp_path / "worker", {**env, "SECURE_LOG_LEVEL": "INFO"}) \
        if location.startswith("postgresql://") else contextlib.nullcontext()
    with worker, ServedSite(tmp_path / "a", env) as a, ServedSite(tmp_path / "b", env) as b:
        audit_id = httpx.post(a.url + "/api/v1/audits/self", timeout=5).json()["id"]
        follower = Follower(f"{b.url}/api/v1/audits/{audit_id}/events")
        data = wait_done_sync(a.url, audit_id, seconds=60)
        follower.join(30)
    assert data["status"] == "done"
    stored = stored_rows(location, audit_id)
    assert sorted(follower.arrived) == sorted(stored) == list(range(1, len(data["checks"]) + 1))
    gaps = {seq: follower.arrived[seq] - finished_at for seq, finished_at in stored.items()}
    assert max(stored.values()) - min(stored.values()) > 2 * LIMIT  # rows spread over time: live, not at `done`
    assert all(-0.05 < gap < LIMIT for gap in gaps.values()), sorted(gaps.items())
    print(f"rows {len(gaps)}, gap max {max(gaps.values()):.3f} s, last {gaps[max(gaps)]:.3f} s")
