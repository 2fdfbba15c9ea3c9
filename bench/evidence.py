"""Evidence benchmark: how much an audit of hostile mail servers stores and how big its JSON and page get.

    .venv/bin/python bench/evidence.py [--hosts 32] [--greeting 16384]

A fake SMTP server on 127.0.0.1 .. 127.0.0.N (one port, the same on every address) greets with a multi-line
greeting of about `--greeting` bytes (bytes that the evidence escapes as \\xNN, unless --text) and refuses to
relay. One relay audit of all N addresses runs in-process; then we print the transcript bytes stored in SQLite,
the size of GET /api/v1/audits/{id}, of the result page and of one SSE replay, and how much the process's peak
RSS grew while serving them. Everything stays on loopback.
Set SYS_ROOT to measure another checkout (e.g. SYS_ROOT=/work/main for the numbers before a change).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("SYS_ROOT") or Path(__file__).resolve().parent.parent)
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes import smtp as fakes  # noqa: E402
from support import running_app  # noqa: E402

from app.config import Settings  # noqa: E402


class HostileGreeting(fakes.Policy):
    def __init__(self, size: int, binary: bool) -> None:
        super().__init__()
        line = 250
        count = max(1, min(63, size // line))
        fill = bytes(range(0x80, 0x100)) if binary else b"x" * 128  # binary: every byte escaped as \xNN
        self.banner = b"".join((f"220-hostile.test.example {i:03d} ".encode() + fill * 2)[:line - 2] + b"\r\n"
                               for i in range(count)) + b"220 hostile.test.example ESMTP\r\n"


async def serve_on(policy: fakes.Policy, hosts: list[str]) -> tuple[list[asyncio.base_events.Server], int]:
    handler = fakes.FakeSmtpServer(policy)._handle
    for _ in range(10):  # bounded: another process may hold the port on one of the addresses
        first = await asyncio.start_server(handler, hosts[0], 0)
        port = first.sockets[0].getsockname()[1]
        try:
            rest = await asyncio.start_server(handler, hosts[1:], port) if hosts[1:] else None
        except OSError:
            first.close()
            continue
        return [s for s in (first, rest) if s is not None], port
    raise RuntimeError("no common free port on the loopback addresses")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stored_bytes(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        checks = conn.execute("SELECT COALESCE(SUM(LENGTH(transcript)), 0) FROM checks").fetchone()[0]
        has_openings = conn.execute("SELECT 1 FROM sqlite_master WHERE name='openings'").fetchone()
        openings = conn.execute("SELECT COALESCE(SUM(LENGTH(lines)), 0) FROM openings").fetchone()[0] \
            if has_openings else 0
        return checks, openings
    finally:
        conn.close()


async def main(hosts_count: int, greeting: int, binary: bool) -> None:
    hosts = [f"127.0.0.{i}" for i in range(1, hosts_count + 1)]
    policy = HostileGreeting(greeting, binary)
    servers, port = await serve_on(policy, hosts)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        settings = Settings(database_url=f"sqlite:///{db}", public_url="http://testserver",
                            allow_networks=["127.0.0.0/8"], relay_ports=[port], proxy_ports=[],
                            connect_timeout=5, smtp_command_timeout=10, audit_deadline=120, target_cooldown=0)
        async with running_app(settings) as client:
            auditor = client.app.state.sys.auditor
            started = time.perf_counter()
            audit = await auditor.start(target="self", requester="127.0.0.1", hosts=hosts, services=["relay"])
            await asyncio.wait_for(asyncio.shield(auditor._tasks[audit.id]), 150)
            seconds = time.perf_counter() - started
            checks, openings = stored_bytes(db)
            rss_before = maxrss_mib()
            response = await client.get(f"/api/v1/audits/{audit.id}")
            rss_api = maxrss_mib()
            page = await client.get(f"/audits/{audit.id}")
            rss_page = maxrss_mib()
            sse = await client.get(f"/api/v1/audits/{audit.id}/events")
            rss_sse = maxrss_mib()
            data = response.json()
            greeted = sum(1 for c in data["checks"] if any("hostile.test.example 000" in line["text"]
                                                           for line in c["transcript"]))
    for server in servers:
        server.close()
    mib = 1024 * 1024
    print(f"{hosts_count} hosts x 1 port, greeting {len(policy.banner)} bytes; audit took {seconds:.1f} s; "
          f"{len(data['checks'])} rows ({greeted} show the greeting); summary {data['summary']}")
    print(f"stored transcripts: {(checks + openings) / mib:.2f} MiB (rows {checks / mib:.2f} MiB, "
          f"shared openings {openings / mib:.2f} MiB)")
    print(f"GET /api/v1/audits/id: {len(response.content) / mib:.2f} MiB JSON, "
          f"peak RSS +{rss_api - rss_before:.0f} MiB")
    print(f"GET /audits/id: {len(page.content) / mib:.2f} MiB HTML, peak RSS +{rss_page - rss_api:.0f} MiB")
    print(f"GET /api/v1/audits/id/events: {len(sse.content) / mib:.2f} MiB, peak RSS +{rss_sse - rss_page:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--greeting", type=int, default=16 * 1024)
    parser.add_argument("--text", action="store_true", help="a printable greeting (default: bytes that need escaping)")
    args = parser.parse_args()
    asyncio.run(main(args.hosts, args.greeting, not args.text))
