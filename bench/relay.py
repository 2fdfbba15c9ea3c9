"""Relay benchmark: our relay checks against real open and closed MTAs (Postfix, Exim, Sendmail, OpenSMTPD),
beside nmap's smtp-open-relay script against the same instances in the same run (when nmap is installed).

    make bench            (or: .venv/bin/python bench/relay.py [--rounds N] [--only postfix,exim,...])

Our probes are timed in-process; nmap is timed as a process (its start-up is printed separately). Printed per
fixture: our time, nmap's, the ratio ours/nmap (medians, measured in this run), and our summary verdict beside
nmap's and the verdict the fixture is built to give. Goals (issue 3, for every MTA): a closed server, all variants
in at most 1/4 of nmap's time; an open one, every variant's verdict in at most 1.5x nmap's time, and the sink
confirmation within 2 s after; our verdict the expected one. nmap's verdict is printed, not held to a goal (it
tests 16 forms of its own and cannot see where a message went).
Needs root and Debian's postfix, the MTAs extracted by scripts/install-mta.sh (a missing one is reported and left
out), and nmap for the baseline; everything stays on 127.0.0.1.
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

from servers.exim import start_exim  # noqa: E402
from servers.mta import MtaStartError, MtaUnavailable  # noqa: E402
from servers.opensmtpd import start_opensmtpd  # noqa: E402
from servers.postfix import PostfixStartError, PostfixUnavailable, start_postfix  # noqa: E402
from servers.sendmail import start_sendmail  # noqa: E402
from support import PROBE_DOMAIN, Slots, relay_port  # noqa: E402

from app.probes.sink import Sink  # noqa: E402
from app.verdicts import Verdict, summarize  # noqa: E402

# name -> start(base, kind, sink_port=...); each in an "open" and a "closed" kind (the README's fixture table)
MTAS = {"postfix": start_postfix, "exim": start_exim, "sendmail": start_sendmail, "opensmtpd": start_opensmtpd}
KINDS = ("open", "closed")
GOALS = {"closed": 0.25, "open": 1.5}  # ours/nmap
CONFIRM_GOAL = 2.0  # seconds from the last verdict to the last relayed message at our sink
UNAVAILABLE = (PostfixUnavailable, PostfixStartError, MtaUnavailable, MtaStartError)


def nmap_seconds(port: int) -> tuple[float, str] | None:
    nmap = shutil.which("nmap")
    if nmap is None:
        return None
    started = time.perf_counter()
    done = subprocess.run(
        [nmap, "-n", "-Pn", "-p", str(port), "--script", "+smtp-open-relay",
         "--script-args", f"smtp-open-relay.domain={PROBE_DOMAIN},smtp-open-relay.ip=127.0.0.1", "127.0.0.1"],
        capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    summary = next((line.strip("|_ ") for line in done.stdout.splitlines() if "relay" in line.lower()), "?")
    return elapsed, summary


def nmap_verdict(summary: str) -> str:
    """smtp-open-relay says "Server is an open relay (N/16 tests)" or "Server doesn't seem to be an open relay,
    all tests failed"."""
    text = summary.lower()
    if "doesn't seem to be an open relay" in text:
        return "closed"
    if "is an open relay" in text:
        return f"open ({summary.split('(')[-1].rstrip(')')})"
    return f"? ({summary})"


def nmap_startup() -> float | None:
    nmap = shutil.which("nmap")
    if nmap is None:
        return None
    started = time.perf_counter()
    subprocess.run([nmap, "--version"], capture_output=True, timeout=30)
    return time.perf_counter() - started


async def ours(port: int, sink: Sink) -> dict:
    slots = Slots(limit=3)
    started = time.perf_counter()
    results = await relay_port(port, slots=slots, command_timeout=30, port_deadline=180)
    verdicts_at = time.perf_counter() - started
    tags = {r.tag for r in results.values() if r.verdict is Verdict.OPEN and r.tag}
    arrived = await sink.wait_for(tags, 10) if tags else set()
    confirmed_after = time.perf_counter() - started - verdicts_at
    return {"seconds": verdicts_at, "connections": slots.total, "open": len(tags), "arrived": len(arrived),
            "confirm_after": confirmed_after if tags else 0.0,
            "verdict": summarize((r.verdict, r.reason) for r in results.values()).value}


async def bench_one(label: str, kind: str, port: int, sink: Sink, rounds: int) -> int:
    """One fixture: our rounds, then nmap's; prints two lines, returns the number of goals missed."""
    runs = [await ours(port, sink) for _ in range(rounds)]
    nmap_runs = [await asyncio.to_thread(nmap_seconds, port) for _ in range(rounds)]
    ours_s = statistics.median(r["seconds"] for r in runs)
    last = runs[-1]
    verdicts = {r["verdict"] for r in runs}
    failures = int(verdicts != {kind})
    line = (f"{label:18} ours {ours_s:7.3f} s (median of {rounds}), {last['connections']} connections, "
            f"{last['open']} open; verdict {'/'.join(sorted(verdicts))} (expected {kind})")
    if kind == "open":
        confirm = statistics.median(r["confirm_after"] for r in runs)
        line += f", {last['arrived']}/{last['open']} reached the sink {confirm:.3f} s later"
        failures += confirm > CONFIRM_GOAL or last["arrived"] < last["open"]
    print(line, flush=True)
    if nmap_runs[0] is not None:
        failures += compare(kind, ours_s, nmap_runs)  # type: ignore[arg-type]
    return failures


def compare(kind: str, ours_s: float, nmap_runs: list[tuple[float, str]]) -> int:
    """nmap's line: its time and verdict, the ratio, and whether the goal was missed. A run in which nmap reached
    no verdict (Exim drops a connection after 3 syntax errors, smtp_max_synprot_errors, and nmap does not
    reconnect) stopped early: its time is no baseline, so the ratio is printed but not held to the goal."""
    nmap_s = statistics.median(n[0] for n in nmap_runs)
    ratio, goal = ours_s / nmap_s, GOALS[kind]
    finished = all(not nmap_verdict(n[1]).startswith("?") for n in nmap_runs)
    outcome = ("ok" if ratio <= goal else "MISSED") if finished else "not held: nmap stopped without a verdict"
    print(f"{'':18} nmap {nmap_s:7.3f} s, verdict {nmap_verdict(nmap_runs[-1][1])}; "
          f"ratio ours/nmap {ratio:.3f} (goal <= {goal}) {outcome}", flush=True)
    return int(finished and ratio > goal)


async def main(rounds: int, only: list[str]) -> int:
    base = Path(tempfile.mkdtemp(prefix="sysb"))
    sink = Sink(PROBE_DOMAIN)
    await sink.start("127.0.0.1", 0)
    failures = 0
    try:
        startup = nmap_startup()
        print(f"nmap: {'not installed (no baseline)' if startup is None else f'start-up alone {startup:.3f} s'}")
        for name in only:
            for kind in KINDS:
                try:
                    instance = await asyncio.to_thread(MTAS[name], base, kind, sink_port=sink.port)
                except UNAVAILABLE as exc:
                    print(f"{name} {kind}: not benchmarked: {str(exc).splitlines()[0]}", flush=True)
                    continue
                try:
                    failures += await bench_one(f"{kind:6} {name}", kind, instance.port, sink, rounds)
                finally:
                    await asyncio.to_thread(instance.stop)
    finally:
        await sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(MTAS), help="comma-separated MTAs (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if unknown := set(names) - set(MTAS):
        parser.error(f"unknown MTA {sorted(unknown)}; choose from {sorted(MTAS)}")
    sys.exit(asyncio.run(main(max(1, min(args.rounds, 20)), names)))
