"""Instances benchmark: what a second process adds, on this machine (issue 16).

    make bench-instances      (or: .venv/bin/python bench/instances.py [--rounds 3] [--audits 100])

Two measures, each of one process beside two, in the same run:

- Pages: two sites on one SQLite database seeded with bench/pages.py's finished 45-check audit, one run as
  `serve --workers 1`, the other as `serve --workers 2` (one port, two uvicorn processes accepting on it). `ab`
  loads `/`, `/guides/postfix` and the audit's JSON at concurrency 16; each round measures a route on the one
  process and then on the two, back to back, so that a pair shares the machine's load. Printed: the medians of
  requests/s and of the pairs' ratios (two processes / one). Goal: >= 1.6x on every route (a miss exits 1).
- Audits per minute: a site with `--workers 1`, then one with `--workers 2` (SQLite, the embedded default: each web
  process runs the audits it admitted), each given the same burst of N `self` audits of the relay service from N
  loopback addresses (a trusted proxy header names each requester, 127.0.0.10 onwards), each answered by a small
  SMTP server that refuses to relay on every one of those addresses. Printed: audits per minute from the first
  audit's creation to the last one's end as the site stored them, and the ratio (no goal is set for it).
- The same burst with the job queue: Debian's PostgreSQL and Redis started on loopback (tests/servers), one
  `serve` and one `worker`, then one `serve` and two `worker` processes, each pair on a fresh database
  (`--no-queue` leaves it out, e.g. without PostgreSQL installed).

Set SYS_ROOT to measure another checkout. Everything stays on 127.0.0.0/8; loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from pages import ROOT, ab, free_port, seed, served  # noqa: E402

PAGE_GOAL = 1.6
CONCURRENCY = 16
FIRST_REQUESTER = 10  # 127.0.0.10, .11, ...: one requester (and one audited address) per audit


def site_env(db: Path, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SECURE_DATABASE_URL": f"sqlite:///{db}",
            "SECURE_PUBLIC_URL": url, "SECURE_LOG_LEVEL": "WARNING", "SECURE_TARGET_COOLDOWN": "0",
            **(extra or {})}


def serve_command(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]


def pages(rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per route: the medians of requests/s on one process and on two, and of the pairs' ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "site.db"
        audit_id = asyncio.run(seed(db))
        sites = {}
        with ExitStack() as stack:
            for workers in (1, 2):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                stack.enter_context(served(serve_command(port, workers), ROOT, site_env(db, url), url + "/healthz",
                                   folder / f"site{workers}.log"))
                sites[workers] = url
            paths = {"home /": ("/", 3000), "guide /guides/postfix": ("/guides/postfix", 2000),
                     "audit JSON": (f"/api/v1/audits/{audit_id}", 1000)}
            for path, _count in paths.values():  # warm-up: every process of both sites
                for url in sites.values():
                    ab(url + path, 200, 4)
            one: dict[str, list[float]] = {name: [] for name in paths}
            two: dict[str, list[float]] = {name: [] for name in paths}
            ratios: dict[str, list[float]] = {name: [] for name in paths}
            for _round in range(rounds):
                for name, (path, count) in paths.items():
                    single = ab(sites[1] + path, count, CONCURRENCY)
                    double = ab(sites[2] + path, count, CONCURRENCY)
                    one[name].append(single)
                    two[name].append(double)
                    ratios[name].append(double / single)
    return {name: (statistics.median(one[name]), statistics.median(two[name]), statistics.median(ratios[name]))
            for name in paths}


class RefusingSmtp:
    """An SMTP server on one port of several loopback addresses that answers every relay attempt with 554."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.connections = 0

    async def __aenter__(self) -> RefusingSmtp:
        self.servers = []
        for _attempt in range(20):  # a port free on every address: bounded tries
            self.port = free_port()
            try:
                for host in self.hosts:
                    self.servers.append(await asyncio.start_server(self.handle, host, self.port))
                return self
            except OSError:
                await self.close()
        raise SystemExit("no port free on every loopback address")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()
        self.servers = []

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 bench.example ESMTP Postfix (Debian/GNU)\r\n")
            for _ in range(200):  # bounded
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line or line[:4].upper() == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                verb = line[:4].upper()
                reply = {b"RCPT": b"554 5.7.1 <x@elsewhere.example>: Relay access denied\r\n",
                         b"DATA": b"503 5.5.1 Error: need RCPT command\r\n",
                         b"EHLO": b"250-bench.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"}
                writer.write(reply.get(verb, b"250 2.0.0 Ok\r\n"))
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()


async def audit_burst(url: str, count: int, seconds: float = 300.0) -> list[str]:
    """Start `count` audits from as many requesters at once and wait until every one is `done`; their ids."""
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=count)) as client:
        answers = await asyncio.gather(*(
            client.post("/api/v1/audits/self", json={"checks": ["relay"]},
                        headers={"X-Forwarded-For": f"127.0.0.{FIRST_REQUESTER + n}"}) for n in range(count)))
        refused = [a.status_code for a in answers if a.status_code != 202]
        if refused:
            raise SystemExit(f"audits refused: {refused[:5]} {answers[0].text[:300]}")
        ids = [a.json()["id"] for a in answers]
        waiting = set(ids)
        deadline = time.monotonic() + seconds
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            bodies = await asyncio.gather(*(client.get(f"/api/v1/audits/{i}") for i in waiting))
            for body in (b.json() for b in bodies):
                if body["status"] not in ("queued", "running"):
                    if body["status"] != "done":
                        raise SystemExit(f"audit {body['id']} ended {body['status']}: {body.get('error')}")
                    waiting.discard(body["id"])
        if waiting:
            raise SystemExit(f"{len(waiting)} audits not done within {seconds} s")
        return ids


def audits_per_minute(database: str, ids: list[str]) -> float:
    """From the first audit's creation to the last one's end, as the site stored them (not as a poller saw them).
    `database`: a SQLite file, or a postgresql:// URL."""
    from app.config import POSTGRES_SCHEMES
    from app.store_sql import postgres_sql

    sql, connect = "SELECT created_at, finished_at FROM audits WHERE id=?", sqlite3.connect
    if database.startswith(POSTGRES_SCHEMES):
        import psycopg

        sql, connect = postgres_sql(sql), psycopg.connect
    with connect(database) as conn:
        marks = [conn.execute(sql, (i,)).fetchone() for i in ids]
    return len(ids) / (max(end for _start, end in marks) - min(start for start, _end in marks)) * 60


def burst_settings(smtp_port: int, count: int) -> dict[str, str]:
    return {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_TRUSTED_PROXIES": "127.0.0.1/32",
            "SECURE_RELAY_PORTS": str(smtp_port), "SECURE_PROXY_PORTS": "", "SECURE_MAX_RUNNING_AUDITS": str(count),
            "SECURE_MAX_QUEUED_AUDITS": str(count), "SECURE_CONNECT_TIMEOUT": "5"}


async def queued_audits(count: int) -> dict[int, float]:
    """Audits per minute of a burst of `count` through the job queue: one `serve` and one worker, then two."""
    from servers.postgres import start_postgres
    from servers.redis import start_redis
    from support import AuditWorker

    hosts = [f"127.0.0.{FIRST_REQUESTER + n}" for n in range(count)]
    rates = {}
    postgres, redis = start_postgres(), start_redis()
    try:
        async with RefusingSmtp(hosts) as smtp:
            for workers in (1, 2):
                with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
                    folder = Path(tmp)
                    database = postgres.new_database()
                    port = free_port()
                    url = f"http://127.0.0.1:{port}"
                    env = {**burst_settings(smtp.port, count), "SECURE_DATABASE_URL": database,
                           "SECURE_LIMITS_STORAGE": redis.url_for(workers), "SECURE_LISTENERS": "external",
                           "SECURE_SECRET_KEY": "bench-secret-shared-by-every-process"}
                    stack.enter_context(served(serve_command(port, 1), ROOT, site_env(folder / "unused.db", url, env),
                                               url + "/healthz", folder / "site.log"))
                    for n in range(workers):
                        worker = AuditWorker(folder / f"worker{n}", {**env, "SECURE_LOG_LEVEL": "INFO"})
                        stack.callback(worker.stop)
                    ids = await audit_burst(url, count)
                    rates[workers] = audits_per_minute(database, ids)
    finally:
        redis.stop()
        postgres.stop()
    return rates


async def audits(count: int) -> dict[int, float]:
    """Audits per minute of a burst of `count`, on one web process and on two."""
    hosts = [f"127.0.0.{FIRST_REQUESTER + n}" for n in range(count)]
    rates = {}
    async with RefusingSmtp(hosts) as smtp:
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                env = site_env(folder / "site.db", url, burst_settings(smtp.port, count))
                with served(serve_command(port, workers), ROOT, env, url + "/healthz", folder / "site.log"):
                    ids = await audit_burst(url, count)
                rates[workers] = audits_per_minute(str(folder / "site.db"), ids)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--audits", type=int, default=100, help="audits per burst (at most 200)")
    parser.add_argument("--no-queue", action="store_true", help="leave out the job queue's burst (PostgreSQL)")
    args = parser.parse_args()
    if shutil.which("ab") is None:
        raise SystemExit("ab is missing: apt-get install apache2-utils")
    count = max(1, min(args.audits, 200))
    print(f"{ROOT}: {os.cpu_count()} cores")
    print(f"pages: medians of {args.rounds} rounds, ab concurrency {CONCURRENCY}")
    missed = []
    for name, (single, double, ratio) in pages(args.rounds).items():
        met = ratio >= PAGE_GOAL
        missed += [] if met else [name]
        print(f"  {name:<24} 1 process {single:8.1f} req/s   2 processes {double:8.1f} req/s   {ratio:5.2f}x  "
              f"goal >= {PAGE_GOAL}x: {'met' if met else 'NOT MET'}")
    rates = asyncio.run(audits(count))
    print(f"audits: a burst of {count} relay audits (SQLite, serve --workers N)")
    print(f"  1 process {rates[1]:7.1f} audits/min   2 processes {rates[2]:7.1f} audits/min   "
          f"{rates[2] / rates[1]:5.2f}x")
    if not args.no_queue:
        rates = asyncio.run(queued_audits(count))
        print("audits: the same burst through the job queue (PostgreSQL, Redis; one serve, N workers)")
        print(f"  1 worker  {rates[1]:7.1f} audits/min   2 workers   {rates[2]:7.1f} audits/min   "
              f"{rates[2] / rates[1]:5.2f}x")
    print("all goals met" if not missed else f"goals not met: {', '.join(missed)}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
