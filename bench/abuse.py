"""Abuse benchmark: the most traffic an attacker can aim at one address through the site, per hour.

    make bench-abuse      (or: .venv/bin/python bench/abuse.py [--seconds S])

A real `serve` with the default limits (SECURE_ALLOW_NETWORKS=127.0.0.0/8 so that loopback stands in for a
victim's public address; the cooldown off, which only lowers these figures) is attacked for S seconds (default
20) in each way the README's "Abuse limits" names: one requester; 20 requesters; one IPv6 /64 (behind a trusted
proxy, so the /64 can be spoken from loopback); many verified names pointing at one address; verification checks
aimed at one address. Every hourly limit is a
window of one hour, so what reaches the victim in a short, all-out attack is what reaches it in the whole hour:
the attack spends the hour's budget at once and then gets nothing more. The victim is a counting SMTP server on
the relay port and a counting HTTP server (the verification fetches). Printed: audits of the victim, connections
and HTTP requests that reached it, beside the bound the README states, and their ratio (<= 1.00 holds).
Needs root (the HTTP victim listens on port 80); everything stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes.counting import CountingSmtp, CountingWeb  # noqa: E402
from fakes.dns import FakeDns  # noqa: E402
from support import ServedSite  # noqa: E402

from app.config import Settings  # noqa: E402
from app.probes.smtp import MAX_RECONNECTS, VARIANTS, VARIANTS_PER_SESSION  # noqa: E402

VICTIM = "127.0.0.7"
DEFAULTS = Settings()
# the README's bounds per victim address per hour, from the defaults
AUDITS_BOUND = DEFAULTS.audits_per_target_per_hour
SESSIONS_PER_PORT = -(-len(VARIANTS) // VARIANTS_PER_SESSION)  # the relay variants of one port, in sessions
CONNECTIONS_BOUND = AUDITS_BOUND * SESSIONS_PER_PORT * (1 + MAX_RECONNECTS)  # one relay port
FETCH_BOUND = DEFAULTS.verification_fetches_per_address_per_hour


async def pound(seconds: float, step: Callable[[int], Awaitable[object]], every: float = 0.5) -> int:
    """Call `step(round)` every `every` seconds for `seconds` (bounded in time and count)."""
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and rounds < 1000:
        await step(rounds)
        rounds += 1
        await asyncio.sleep(every)
    return rounds


async def posts(url: str, count: int, path: str, json: dict | None = None, local: str | None = None,
                headers: dict | None = None) -> list[int]:
    transport = httpx.AsyncHTTPTransport(local_address=local) if local else None
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30,
                                 limits=httpx.Limits(max_connections=count)) as client:
        answers = await asyncio.gather(*(client.post(path, json=json, headers=headers) for _ in range(count)),
                                       return_exceptions=True)
    return [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]


async def verify(url: str, dns: FakeDns, domain: str, local: str | None = None,
                 headers: dict | None = None) -> str | None:
    transport = httpx.AsyncHTTPTransport(local_address=local) if local else None
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=10, headers=headers) as client:
        created = await client.post("/api/v1/verifications", json={"domain": domain})
        if created.status_code != 201:
            return None
        body = created.json()
        dns.set(body["dns"]["name"], "TXT", [f'"{body["dns"]["value"]}"'])
        check = (await client.post(f"/api/v1/verifications/{body['id']}/check")).json()
        return body["id"] if check.get("status") == "verified" else None


def audits_of(db: Path, address: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM audit_addresses WHERE address=?", (address,)).fetchone()[0]


async def scenario(name: str, seconds: float, attack: Callable[[str, FakeDns, Path], Awaitable[None]],
                   extra_env: dict[str, str] | None = None) -> dict[str, object]:
    async with FakeDns() as dns, CountingSmtp(VICTIM) as smtp, CountingWeb(VICTIM) as web:
        env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(smtp.port),
               "SECURE_PROXY_PORTS": "", "SECURE_DNS_SERVERS": dns.server, "SECURE_LOG_LEVEL": "WARNING",
               "SECURE_CONNECT_TIMEOUT": "2", "SECURE_TARGET_COOLDOWN": "0",
               "SECURE_MAX_CONNECTIONS_PER_PEER": "400",  # every request of a burst reaches the limits
               **(extra_env or {})}
        with tempfile.TemporaryDirectory() as folder, ServedSite(Path(folder), env) as site:
            started = time.monotonic()
            await attack(site.url, dns, site.db)
            await asyncio.sleep(3)  # let the last admitted audits reach the victim
            audits = audits_of(site.db, VICTIM)
            took = time.monotonic() - started
    return {"scenario": name, "seconds": round(took, 1), "audits": audits, "connections": smtp.total,
            "at_once": smtp.most, "fetches": web.requests}


def names_for(dns: FakeDns, count: int, prefix: str) -> list[str]:
    names = [f"{prefix}{n}.test" for n in range(count)]
    for name in names:
        dns.set(name, "MX", [f"10 mx.{name}."])
        dns.set(f"mx.{name}", "A", [VICTIM])
        dns.set(name, "A", [VICTIM])
    return names


async def domain_audits(url: str, names: dict[str, str], local: str | None = None,
                        headers: dict | None = None) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=local) if local else None
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30, headers=headers) as client:
        await asyncio.gather(*(client.post("/api/v1/audits", json={"target": n, "verification": v, "checks": c})
                               for n, v in names.items() for c in (["relay"], ["relay", "proxy"])),
                             return_exceptions=True)


def one_requester(seconds: float) -> Callable[[str, FakeDns, Path], Awaitable[None]]:
    async def attack(url: str, dns: FakeDns, db: Path) -> None:  # the victim's own address, hammered
        await pound(seconds, lambda _r: posts(url, 20, "/api/v1/audits/self", local=VICTIM))
    return attack


def requesters(seconds: float, count: int, prefix: str,
               identity: Callable[[int], tuple[str | None, dict[str, str] | None]]
               ) -> Callable[[str, FakeDns, Path], Awaitable[None]]:
    """`count` requesters, each verifying its own name for the victim (`identity(n)`: the local address it
    connects from, or the forwarding header a trusted proxy sets), then all starting audits all the time."""
    async def attack(url: str, dns: FakeDns, db: Path) -> None:
        names: dict[str, tuple[str, str | None, dict[str, str] | None]] = {}
        for n, name in enumerate(names_for(dns, count, prefix)):
            local, headers = identity(n)
            vid = await verify(url, dns, name, local=local, headers=headers)
            if vid:
                names[name] = (vid, local, headers)

        async def step(_round: int) -> None:
            await asyncio.gather(*(domain_audits(url, {n: v}, local=local, headers=headers)
                                   for n, (v, local, headers) in names.items()))
        await pound(seconds, step)
    return attack


def many_names(seconds: float) -> Callable[[str, FakeDns, Path], Awaitable[None]]:
    async def attack(url: str, dns: FakeDns, db: Path) -> None:  # one requester, 20 names for the victim
        names = {}
        for name in names_for(dns, 20, "alias"):
            vid = await verify(url, dns, name)
            if vid:
                names[name] = vid
        await pound(seconds, lambda _r: domain_audits(url, names))
    return attack


def verification_checks(seconds: float) -> Callable[[str, FakeDns, Path], Awaitable[None]]:
    async def attack(url: str, dns: FakeDns, db: Path) -> None:  # pending verifications, checked all the time
        ids = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for name in names_for(dns, 20, "fetch"):
                created = await client.post("/api/v1/verifications", json={"domain": name})
                if created.status_code == 201:
                    ids.append(created.json()["id"])

        async def step(_round: int) -> None:
            await asyncio.gather(*(posts(url, 10, f"/api/v1/verifications/{vid}/check") for vid in ids))
        await pound(seconds, step)
    return attack


async def main(seconds: float) -> int:
    trusted = {"SECURE_TRUSTED_PROXIES": "127.0.0.1/32"}
    runs = [
        await scenario("one requester", seconds, one_requester(seconds)),
        await scenario("20 requesters", seconds, requesters(seconds, 20, "req", lambda n: (f"127.0.1.{n + 1}", None))),
        await scenario("one IPv6 /64", seconds, requesters(  # 40 addresses of one /64, behind a trusted proxy
            seconds, 40, "six", lambda n: (None, {"X-Forwarded-For": f"2001:db8:7:7::{n + 1:x}"})), trusted),
        await scenario("20 names, one address", seconds, many_names(seconds)),
        await scenario("verification checks", seconds, verification_checks(seconds)),
    ]
    print(f"bounds per victim address per hour (README, defaults): {AUDITS_BOUND} audits, "
          f"{CONNECTIONS_BOUND} SMTP connections on one relay port, {DEFAULTS.max_connections_per_host} at once, "
          f"{FETCH_BOUND} verification fetches")
    print(f"{'scenario':24} {'s':>5} {'audits':>7} {'ratio':>6} {'conns':>6} {'ratio':>6} {'at once':>7} "
          f"{'fetches':>7} {'ratio':>6}")
    held = True
    for run in runs:
        ratios = (run["audits"] / AUDITS_BOUND, run["connections"] / CONNECTIONS_BOUND,  # type: ignore[operator]
                  run["fetches"] / FETCH_BOUND)  # type: ignore[operator]
        held = held and max(ratios) <= 1 and run["at_once"] <= DEFAULTS.max_connections_per_host  # type: ignore[operator]
        print(f"{run['scenario']:24} {run['seconds']:>5} {run['audits']:>7} {ratios[0]:>6.2f} {run['connections']:>6} "
              f"{ratios[1]:>6.2f} {run['at_once']:>7} {run['fetches']:>7} {ratios[2]:>6.2f}")
    print("every bound holds" if held else "A BOUND IS BROKEN")
    return 0 if held else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each attack lasts")
    sys.exit(asyncio.run(main(parser.parse_args().seconds)))
