"""Retention benchmark: the purge of expired audits at a restart, batched (app/retention.py) against the old one
statement (the baseline, kept here only), on identical copies of the same database, in the same run.

    .venv/bin/python bench/retention.py [--sizes 10000,100000] [--recent 2000] [--cap 300] [--bound 3600]

For each size we seed a database with that many expired audits (each 20-45 checks with transcripts, shared relay
openings, one or two addresses; a quarter are re-tests of an older audit) and `--recent` audits within the retention
period (some re-tests of expired ones), plus expired and live verifications: six template audits are written
through the Store API, then copied row for row with new ids and dates (bulk SQL, what the Store would write).
Then, per copy, `secure-your-server serve` starts on it (a subprocess, on loopback) and we measure: the time from
the process start to the first `/healthz` answer; while the purge runs, the latency of `GET /healthz` (one store
call) and `GET /api/v1/audits/{id}` of a recent audit (several), polled one after the other; the purge's total
time and its longest single hold of the store (its own log line). The baseline copy has the schema of before
(without the purge's indexes) and runs the old statement at start, as main did. A baseline that has not finished
after `--cap` seconds is stopped and reported as at least that (the batched run after `--bound`). Afterwards each
copy is checked: nothing expired left, every recent audit kept, no orphan child rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from app import ENGINE_VERSION  # noqa: E402
from app.store import _PURGE_INDEXES, Audit, Store, new_id  # noqa: E402
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict  # noqa: E402

RETENTION_DAYS = 90
DAY = 86400.0
CHECK_COUNTS = (20, 25, 30, 35, 40, 45)  # one template audit each


# --- templates through the Store API --------------------------------------------------------------------------
def _opening(host: str, port: int) -> Opening:
    lines = [TranscriptLine(0.0, "info", f"connecting to {host}:{port}"),
             TranscriptLine(0.041, "in", "220 mx.example.net ESMTP Postfix (Debian/GNU)"),
             TranscriptLine(0.042, "out", "EHLO probe.secure.example"),
             *(TranscriptLine(0.05, "in", text) for text in (
                 "250-mx.example.net", "250-PIPELINING", "250-SIZE 10240000", "250-VRFY", "250-ETRN",
                 "250-STARTTLS", "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250 SMTPUTF8"))]
    return Opening(f"{port}-{new_id()[:8]}", lines)


def _relay_check(host: str, port: int, variant: int, opening: Opening) -> CheckResult:
    sender = f"probe-{variant:02d}@probe.secure.example"
    own = [TranscriptLine(0.06, "out", f"MAIL FROM:<{sender}>"), TranscriptLine(0.07, "in", "250 2.1.0 Ok"),
           TranscriptLine(0.07, "out", f"RCPT TO:<relay-test+v{variant}@sink.secure.example>"),
           TranscriptLine(0.09, "in", f"554 5.7.1 <relay-test+v{variant}@sink.secure.example>: Relay access denied"),
           TranscriptLine(0.09, "out", "RSET"), TranscriptLine(0.10, "in", "250 2.0.0 Ok"),
           TranscriptLine(0.10, "info", "the server refused to relay")]
    return CheckResult("relay", host, port, f"relay.v{variant}", Verdict.CLOSED, "relay_denied",
                       fingerprint={"product": "Postfix", "version": None,
                                    "raw": "220 mx.example.net ESMTP Postfix (Debian/GNU)"},
                       transcript=[*opening.lines, *own], tag=new_id()[:16], opening=opening)


def _proxy_check(host: str, port: int) -> CheckResult:
    lines = [TranscriptLine(0.0, "info", f"connecting to {host}:{port}"),
             TranscriptLine(0.02, "out", "CONNECT canary.secure.example:25 HTTP/1.1"),
             TranscriptLine(0.05, "in", "HTTP/1.1 403 Forbidden"), TranscriptLine(0.05, "in", "Server: squid/5.7"),
             TranscriptLine(0.05, "in", "Content-Type: text/html;charset=utf-8"),
             TranscriptLine(0.06, "info", "the proxy refused to reach our canary")]
    return CheckResult("proxy", host, port, "proxy.connect_smtp", Verdict.CLOSED, "destination_denied",
                       fingerprint={"product": "Squid", "version": "5.7", "raw": "Server: squid/5.7"},
                       transcript=lines)


def _checks(count: int, host: str) -> list[CheckResult]:
    checks: list[CheckResult] = []
    for port in (25, 587, 465):
        opening = _opening(host, port)
        checks += [_relay_check(host, port, variant, opening) for variant in range(1, 12)]
    for port in (80, 3128, 8080, 1080, 8118, 8888, 9050, 23, 443, 6588, 8000, 8123):
        checks.append(_proxy_check(host, port))
    return checks[:count]


async def write_templates(store: Store) -> list[str]:
    ids = []
    for number, count in enumerate(CHECK_COUNTS):
        host = f"192.0.2.{number + 1}"
        hosts = [host, f"2001:db8::{number + 1}"] if number % 2 else [host]
        audit = Audit(id=new_id(), created_at=time.time(), status="queued", target="self", requester=host,
                      hosts=hosts, services=["relay", "proxy"], planned=count, engine_version=ENGINE_VERSION)
        await store.create_audit(audit, hosts)
        await store.mark_running(audit.id)
        for seq, result in enumerate(_checks(count, host), start=1):
            await store.add_check(audit.id, seq, result)
        await store.finish_audit(audit.id, "done", {"relay": "closed", "proxy": "closed"})
        ids.append(audit.id)
    return ids


# --- bulk copies -------------------------------------------------------------------------------------------
def _rows(conn: sqlite3.Connection, table: str, audit_id: str) -> list[dict[str, Any]]:
    column = "id" if table == "audits" else "audit_id"
    return [dict(row) for row in conn.execute(f"SELECT * FROM {table} WHERE {column}=?", (audit_id,))]


def _insert(conn: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        columns = list(rows[0])
        conn.executemany(f"INSERT INTO {table}({','.join(columns)}) VALUES ({','.join('?' * len(columns))})",
                         [tuple(row[c] for c in columns) for row in rows])


def _copy_of(template: dict[str, list[dict[str, Any]]], number: int, created: float,
             previous: str | None) -> dict[str, list[dict[str, Any]]]:
    audit_id = new_id()
    address = f"198.51.{number // 250 % 250}.{number % 250 + 1}"
    audit = {**template["audits"][0], "id": audit_id, "created_at": created, "started_at": created + 0.2,
             "finished_at": created + 40, "previous_id": previous, "requester": address, "requester_key": address}
    return {
        "audits": [audit],
        "checks": [{**row, "audit_id": audit_id, "finished_at": created + 1 + row["seq"],
                    "tag": f"{number:x}-{row['seq']}" if row["tag"] else None} for row in template["checks"]],
        "openings": [{**row, "audit_id": audit_id} for row in template["openings"]],
        "audit_addresses": [{**row, "audit_id": audit_id, "address": f"{row['address']}#{number}",
                             "created_at": created} for row in template["audit_addresses"]],
    }


def seed(db: Path, expired: int, recent: int, rng: random.Random) -> list[str]:
    """The database: the templates, then `expired` old and `recent` live copies. Returns the live audits' ids."""
    async def templates() -> list[str]:
        store = Store(str(db))
        await store.open()
        try:
            return await write_templates(store)
        finally:
            await store.close()
    template_ids = asyncio.run(templates())
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    tables = ("audits", "checks", "openings", "audit_addresses")
    shapes = [{table: _rows(conn, table, audit_id) for table in tables} for audit_id in template_ids]
    now, old_ids, live = time.time(), [], list(template_ids)
    for number in range(expired + recent):
        if number < expired:
            created = now - (RETENTION_DAYS + 1 + rng.random() * 300) * DAY
        else:
            created = now - rng.random() * (RETENTION_DAYS - 1) * DAY
        previous = rng.choice(old_ids) if old_ids and rng.random() < 0.25 else None
        copy = _copy_of(shapes[number % len(shapes)], number, created, previous)
        for table in tables:
            _insert(conn, table, copy[table])
        (old_ids if number < expired else live).append(copy["audits"][0]["id"])
        if number % 5000 == 4999:
            conn.commit()
    conn.executemany("INSERT INTO verifications(id_hash, domain, token, requester, created_at, expires_at)"
                     " VALUES (?,?,?,?,?,?)",
                     [(new_id(), f"d{n}.example", new_id(), "198.51.100.9", now - days * DAY,
                       now - (days - 30) * DAY) for n, days in enumerate(
                           [RETENTION_DAYS + 31 + rng.random() * 200] * (expired // 10) + [5.0] * 50)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return live


def as_before(db: Path) -> None:
    """The baseline copy: the schema of before, without the indexes the batched purge added."""
    conn = sqlite3.connect(db)
    for statement in _PURGE_INDEXES:
        conn.execute(f"DROP INDEX {statement.split()[5]}")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def census(db: Path, cutoff: float) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        one = lambda sql: conn.execute(sql, (cutoff,) if "?" in sql else ()).fetchone()[0]  # noqa: E731
        return {
            "expired": one("SELECT COUNT(*) FROM audits WHERE created_at < ?"),
            "audits": one("SELECT COUNT(*) FROM audits"),
            "checks": one("SELECT COUNT(*) FROM checks"),
            "orphans": sum(one(f"SELECT COUNT(*) FROM {table} WHERE audit_id NOT IN (SELECT id FROM audits)")
                           for table in ("checks", "openings", "audit_addresses")),
            "dangling_previous": one("SELECT COUNT(*) FROM audits WHERE previous_id IS NOT NULL AND previous_id"
                                     " NOT IN (SELECT id FROM audits)"),
            "expired_verifications": one("SELECT COUNT(*) FROM verifications WHERE expires_at < ?"),
        }
    finally:
        conn.close()


# --- the served site (a subprocess of this file) ---------------------------------------------------------------
def serve_baseline() -> None:
    """Before: the schema without the purge's indexes, and the whole purge in one statement at start."""
    import app.main
    import app.store
    from app.logs import get_logger

    for statement in _PURGE_INDEXES:
        app.store._SCHEMA = app.store._SCHEMA.replace(f"{statement};\n", "")
    log = get_logger("retention")

    def old_purge(c: sqlite3.Connection, cutoff: float) -> tuple[int, float]:
        start = time.perf_counter()
        c.execute("UPDATE audits SET previous_id=NULL WHERE previous_id IN"
                  " (SELECT id FROM audits WHERE created_at < ? AND status NOT IN ('queued','running'))", (cutoff,))
        c.execute("DELETE FROM verifications WHERE expires_at < ?", (cutoff,))
        count = c.execute("DELETE FROM audits WHERE created_at < ? AND status NOT IN ('queued','running')",
                          (cutoff,)).rowcount
        c.commit()
        return count, time.perf_counter() - start

    async def old_keep_purging(store: Store, days: int, every: float = 3600.0) -> None:
        while True:
            count, held = await store._run(lambda c: old_purge(c, time.time() - days * DAY))
            log.info("audits.purged", extra={"count": count, "batches": 1, "longest_hold_ms": held * 1000,
                                             "holds_over_100ms": int(held > 0.1), "seconds": held})
            await asyncio.sleep(every)

    app.main.keep_purging = old_keep_purging  # type: ignore[assignment]


def served(mode: str, port: int) -> None:
    if mode == "baseline":
        serve_baseline()
    from app.cli import main
    sys.exit(main(["serve", "--port", str(port)]))


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _purged(log: Path) -> dict[str, Any] | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"audits.purge' in line:
            return dict(json.loads(line))
    return None


def measure(db: Path, mode: str, recent_id: str | None, cap: float) -> dict[str, Any]:
    """Start the site on `db`; the time to the first /healthz; latencies while it purges; its purge log line."""
    import httpx

    port, log = _free_port(), db.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SECURE_DATABASE_URL": f"sqlite:///{db}",
           "SECURE_RETENTION_DAYS": str(RETENTION_DAYS), "SECURE_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    result: dict[str, Any] = {"first": None, "healthz": [], "audit": [], "healthz_after": [], "audit_after": [],
                              "purge": None, "load": os.getloadavg()[0]}
    with open(log, "wb") as out:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port)], cwd=ROOT,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _poll(process, port, start, cap, result, log, recent_id, httpx)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return result


def _timed(client: Any, path: str, deadline: float) -> tuple[int, float]:
    sent = time.monotonic()
    answer = client.get(path, timeout=max(0.1, deadline - sent))
    return int(answer.status_code), time.monotonic() - sent


def _poll(process: subprocess.Popen[bytes], port: int, start: float, cap: float, result: dict[str, Any],
          log: Path, recent_id: str | None, httpx: Any) -> None:
    """/healthz and the audit JSON one after the other, each filed under "during" or "after" the purge by whether
    the purge's log line was there when it was sent; 50 of each after it, then stop. No `recent_id`: stop at the
    first answer."""
    deadline = start + cap
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        while time.monotonic() < deadline and process.poll() is None:
            after = _purged(log) is not None
            try:
                status, took = _timed(client, "/healthz", deadline)
            except httpx.ConnectError:
                time.sleep(0.01)
                continue
            except httpx.TimeoutException:
                break
            if status == 200 and result["first"] is None:
                result["first"] = time.monotonic() - start
            if recent_id is None:
                break
            result["healthz_after" if after else "healthz"].append(took)
            after = _purged(log) is not None
            try:
                took = _timed(client, f"/api/v1/audits/{recent_id}", deadline)[1]
            except httpx.TimeoutException:
                break
            result["audit_after" if after else "audit"].append(took)
            if len(result["audit_after"]) >= 50:
                break
            time.sleep(0.02)
    result["purge"] = _purged(log)


# --- report ----------------------------------------------------------------------------------------------------
def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summary(result: dict[str, Any], cap: float) -> dict[str, Any]:
    purge = result["purge"] or {}
    finished = bool(purge.get("event") == "audits.purged")
    return {
        "first_healthz_s": result["first"],
        "purge_s": purge.get("seconds") if finished else None,
        "longest_hold_ms": purge.get("longest_hold_ms") if finished else None,
        "batches": purge.get("batches"), "over": purge.get("holds_over_100ms"),
        "healthz_p50_ms": _ms(result["healthz"], 0.5), "healthz_max_ms": _ms(result["healthz"], 1.0),
        "audit_p50_ms": _ms(result["audit"], 0.5), "audit_max_ms": _ms(result["audit"], 1.0),
        "healthz_idle_ms": _ms(result["healthz_after"], 0.5), "audit_idle_ms": _ms(result["audit_after"], 0.5),
        "samples": len(result["healthz"]), "finished": finished, "cap": cap, "load": result["load"],
    }


def _show(value: float | None, unit: str, cap: float | None = None) -> str:
    if value is None:
        return f">= {cap:.0f} s (stopped)" if cap is not None else "-"
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.3f} {unit}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def report(size: int, new: dict[str, Any], old: dict[str, Any], checks_before: dict[str, int],
           after: dict[str, dict[str, int]]) -> None:
    print(f"\n== {size} expired audits ({checks_before['checks']} checks in the database, "
          f"{checks_before['audits'] - checks_before['expired']} audits to keep)")
    rows = [("time to first /healthz", "first_healthz_s", "s"), ("total purge time", "purge_s", "s"),
            ("longest hold of the store", "longest_hold_ms", "ms"),
            ("GET /healthz during the purge, median", "healthz_p50_ms", "ms"),
            ("GET /healthz during the purge, max", "healthz_max_ms", "ms"),
            ("GET /api/v1/audits/{id} during the purge, median", "audit_p50_ms", "ms"),
            ("GET /api/v1/audits/{id} during the purge, max", "audit_max_ms", "ms"),
            ("GET /healthz after the purge, median", "healthz_idle_ms", "ms"),
            ("GET /api/v1/audits/{id} after the purge, median", "audit_idle_ms", "ms")]
    print(f"{'':50} {'batched':>14} {'baseline (one statement)':>26} {'baseline/batched':>17}")
    for label, key, unit in rows:
        a, b = new[key], old[key]
        capped = old["cap"] if key in ("first_healthz_s", "purge_s", "longest_hold_ms") else None
        if key == "longest_hold_ms" and b is None:
            b_text = f">= {old['cap'] * 1000:.0f} ms (stopped)"
        elif key.endswith(("p50_ms", "max_ms")) and b is None and not old["finished"]:
            b_text = f"no answer in {old['cap']:.0f} s"
        else:
            b_text = _show(b, unit, capped)
        ratio = f"{b / a:.1f}x" if a and b else ("> " + f"{old['cap'] * (1000 if unit == 'ms' else 1) / a:.0f}x"
                                                if a and capped else "-")
        print(f"{label:50} {_show(a, unit):>14} {b_text:>26} {ratio:>17}")
    print(f"{'batches':50} {new['batches'] or '-':>14} {old['batches'] or '-':>26}")
    print(f"{'holds over 100 ms':50} {_count(new['over']):>14} {_count(old['over']):>26}")
    print(f"{'/healthz samples during the purge':50} {new['samples']:>14} {old['samples']:>26}")
    print(f"load average (1 min) at the start of each run: batched {new['load']:.1f}, baseline {old['load']:.1f}"
          f" on {os.cpu_count()} CPUs")
    for name, counts in after.items():
        print(f"after ({name}): {counts}")


def run_size(size: int, recent: int, cap: float, bound: float, work: Path, rng: random.Random) -> None:
    db = work / f"new-{size}.db"
    started = time.perf_counter()
    live = seed(db, size, recent, rng)
    base = work / f"baseline-{size}.db"
    shutil.copyfile(db, base)
    as_before(base)
    cutoff = time.time() - RETENTION_DAYS * DAY
    before = census(db, cutoff)
    print(f"\nseeded {size} expired + {recent + len(CHECK_COUNTS)} recent audits in "
          f"{time.perf_counter() - started:.0f} s ({db.stat().st_size / 2**20:.0f} MiB), copied for the baseline",
          flush=True)
    os.sync()  # the seeding's and the copy's writes on disk before either run: neither pays for them
    new = summary(measure(db, "batched", live[-1], bound), bound)
    os.sync()
    old = summary(measure(base, "baseline", live[-1], cap), cap)
    after = {"batched": census(db, cutoff), "baseline": census(base, cutoff)}
    report(size, new, old, before, after)
    for path in work.glob(f"*-{size}.db*"):
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--recent", type=int, default=2000)
    parser.add_argument("--cap", type=float, default=300.0, help="seconds after which the baseline is stopped")
    parser.add_argument("--bound", type=float, default=3600.0, help="seconds after which the batched run is stopped")
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--serve", choices=("batched", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        served(args.serve, args.port)
        return
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        empty = Path(tmp) / "empty.db"
        seed(empty, 0, 0, rng)
        first = measure(empty, "batched", None, 60)["first"]
        print(f"reference: time to first /healthz on a database with nothing expired: {_show(first, 's')}")
        for size in (int(s) for s in args.sizes.split(",")):
            run_size(size, args.recent, args.cap, args.bound, Path(tmp), rng)


if __name__ == "__main__":
    main()
