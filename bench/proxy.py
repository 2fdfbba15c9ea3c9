"""Proxy benchmark: our whole proxy protocol set per port against real proxies on loopback, beside nmap's
http-open-proxy and socks-open-proxy scripts against the same ports in the same run (when nmap is installed).

    make bench            (or: .venv/bin/python bench/proxy.py [--rounds N] [--only squid,apache,...])

Fixtures (tests/servers/proxies.py, the README's table): Squid open and closed, Dante open, microsocks with a
password, tinyproxy open, Apache open and restricted, nginx as the classic forward proxy and as a site, Privoxy
open and restricted, HAProxy in front of an nginx site (a reverse proxy: never open).
nmap is pointed at our own HTTP canary (proxy.url, proxy.pattern = the check's token) and at a loopback DNS
server; the `+` forces its scripts onto non-standard ports. Our checks are timed in-process, nmap as a process.
Printed per fixture: our time, nmap's, the ratio (medians, this run), our summary verdict beside nmap's and the
verdict the fixture is built to give. Goals (issue 4): our protocol set per port in at most twice nmap's time for
its two scripts, and our verdict the expected one, while finding what nmap cannot (CONNECT to the mail canary, auth
required named as such, a 200 without a tunnel not a proxy). nmap's verdict is printed, not held to a goal.
Needs root and Debian's squid, dante-server, microsocks, tinyproxy, apache2, nginx-light, privoxy, haproxy (a
missing one is reported and left out); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers.proxies import ProxySet, ProxyStartError, ProxyUnavailable  # noqa: E402
from support import Slots, canaries, proxy_port  # noqa: E402

from app.probes.canary import new_check_id  # noqa: E402
from app.verdicts import summarize  # noqa: E402

# (product, label, the verdict it is built to give, how to start it from a ProxySet)
FIXTURES = [
    ("squid", "squid open", "open", lambda pool: pool.squid("open")),
    ("squid", "squid closed", "closed", lambda pool: pool.squid("closed")),
    ("dante", "dante open", "open", lambda pool: pool.dante()),
    ("microsocks", "microsocks+password", "closed", lambda pool: pool.microsocks("user", "secret")),
    ("tinyproxy", "tinyproxy open", "open", lambda pool: pool.tinyproxy("open")),
    ("apache", "apache open", "open", lambda pool: pool.apache("open")),
    ("apache", "apache restricted", "closed", lambda pool: pool.apache("restricted")),
    ("nginx", "nginx forward", "open", lambda pool: pool.nginx("forward")),
    ("nginx", "nginx site", "closed", lambda pool: pool.nginx("site")),
    ("privoxy", "privoxy open", "open", lambda pool: pool.privoxy("open")),
    ("privoxy", "privoxy restricted", "closed", lambda pool: pool.privoxy("restricted")),
    ("haproxy", "haproxy -> nginx site", "closed", lambda pool: pool.haproxy(pool.nginx("site").port)),
]
PRODUCTS = sorted({f[0] for f in FIXTURES})
GOAL = 2.0  # ours/nmap


class LoopbackDns(asyncio.DatagramProtocol):
    """nmap's socks-open-proxy resolves even an IP literal: answer every A query with 127.0.0.1, on loopback."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        import dns.message
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        for question in query.question:
            if question.rdtype == 1:  # A
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", "127.0.0.1"))
        self.transport.sendto(response.to_wire(), addr)


def nmap_run(port: int, http_base: str, token_for) -> tuple[float, str] | None:
    nmap = shutil.which("nmap")
    if nmap is None:
        return None
    check_id = new_check_id()
    args = (f"proxy.url={http_base}/canary/{check_id},proxy.pattern={token_for(check_id)}")
    started = time.perf_counter()
    done = subprocess.run([nmap, "-n", "-Pn", "--dns-servers", "127.0.0.1", "-p", str(port), "--script",
                           "+http-open-proxy,+socks-open-proxy", "--script-args", args, "127.0.0.1"],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    found = [line.strip("|_ ").strip() for line in done.stdout.splitlines() if line.startswith("|")]
    return elapsed, "; ".join(found) or "nothing"


def nmap_verdict(found: str) -> str:
    """http-open-proxy prints "Potentially OPEN proxy." (and the methods that worked), socks-open-proxy
    "status: open" (and the SOCKS versions); both print nothing when they find none."""
    text = found.lower()
    return "open" if "open proxy" in text or "status: open" in text else "closed"


async def ours(port: int, targets) -> tuple[float, int, str, str]:
    slots = Slots(limit=3)
    started = time.perf_counter()
    results = await proxy_port(port, targets, slots=slots, connect_timeout=10, step_timeout=10)
    elapsed = time.perf_counter() - started
    found = ", ".join(f"{name[6:]}={r.verdict.value}" for name, r in results.items()
                      if r.verdict.value in ("open", "auth_required"))
    verdict = summarize((r.verdict, r.reason) for r in results.values()).value
    return elapsed, slots.total, found or "nothing open", verdict


async def bench_one(label: str, expected: str, port: int, targets, nmap_base: str, rounds: int) -> int:
    """One fixture: our rounds, then nmap's; returns the number of goals missed."""
    runs = [await ours(port, targets) for _ in range(rounds)]
    ours_s = statistics.median(r[0] for r in runs)
    verdicts = {r[3] for r in runs}
    failures = int(verdicts != {expected})
    print(f"{label:22} ours {ours_s:6.3f} s (median of {rounds}), {runs[-1][1]} connections, verdict "
          f"{'/'.join(sorted(verdicts))} (expected {expected}): {runs[-1][2]}", flush=True)
    nmap_runs = [await asyncio.to_thread(nmap_run, port, nmap_base, targets.canary.token) for _ in range(rounds)]
    if nmap_runs[0] is not None:
        nmap_s = statistics.median(n[0] for n in nmap_runs)  # type: ignore[index]
        ratio = ours_s / nmap_s
        failures += ratio > GOAL
        found = nmap_runs[-1][1]  # type: ignore[index]
        print(f"{'':22} nmap {nmap_s:6.3f} s, verdict {nmap_verdict(found)}: {found}", flush=True)
        print(f"{'':22} ratio ours/nmap {ratio:.3f} (goal <= {GOAL}) {'ok' if ratio <= GOAL else 'MISSED'}",
              flush=True)
    return failures


async def main(rounds: int, only: list[str]) -> int:
    pool = ProxySet(Path(tempfile.mkdtemp(prefix="sysp")))
    failures = 0
    dns_transport = None
    try:
        dns_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            LoopbackDns, local_addr=("127.0.0.1", 53))
    except OSError as exc:
        print(f"(no loopback DNS for nmap's SOCKS script: {exc}; it will not get past its own lookup)")
    port80 = None
    try:
        async with canaries() as targets:
            # nmap's SOCKS and CONNECT tests always go to port 80 of the proxy.url host: give them a canary there
            from app.probes.canary import HttpCanary

            try:
                port80 = HttpCanary(targets.canary)
                await port80.start("127.0.0.1", 80)
                nmap_base = "http://127.0.0.1:80"
            except OSError as exc:
                print(f"(no canary on 127.0.0.1:80 for nmap's SOCKS/CONNECT tests: {exc})")
                port80, nmap_base = None, targets.http_base
            print("nmap: " + ("not installed (no baseline)" if shutil.which("nmap") is None else "installed"))
            for product, label, expected, start in FIXTURES:
                if product not in only:
                    continue
                try:
                    server = await asyncio.to_thread(start, pool)
                except (ProxyUnavailable, ProxyStartError) as exc:
                    print(f"{label}: not benchmarked: {str(exc).splitlines()[0]}", flush=True)
                    continue
                failures += await bench_one(label, expected, server.port, targets, nmap_base, rounds)
    finally:
        if port80 is not None:
            await port80.stop()
        pool.stop_all()
        if dns_transport is not None:
            dns_transport.close()
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(PRODUCTS), help="comma-separated products (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if unknown := set(names) - set(PRODUCTS):
        parser.error(f"unknown product {sorted(unknown)}; choose from {PRODUCTS}")
    sys.exit(asyncio.run(main(max(1, min(args.rounds, 20)), names)))
