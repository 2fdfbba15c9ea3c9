"""Relay benchmark: our relay checks against a real open and a real closed Postfix, beside nmap's
smtp-open-relay script against the same instances in the same run (when nmap is installed).

    make bench            (or: .venv/bin/python bench/relay.py [--rounds N])

Our probes are timed in-process; nmap is timed as a process (its start-up is printed separately). Printed as
ratios against nmap, measured in this run. Goals (issue 3): closed Postfix, all variants in at most 1/4 of nmap's
time; open Postfix, every variant's verdict in at most 1.5x nmap's time, and the sink confirmation within 2 s after.
Needs root and Debian's postfix (and nmap for the baseline); everything stays on 127.0.0.1.
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

from servers.postfix import start_postfix  # noqa: E402
from support import PROBE_DOMAIN, Slots, relay_port  # noqa: E402

from app.probes.sink import Sink  # noqa: E402
from app.verdicts import Verdict  # noqa: E402


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


def nmap_startup() -> float | None:
    nmap = shutil.which("nmap")
    if nmap is None:
        return None
    started = time.perf_counter()
    subprocess.run([nmap, "--version"], capture_output=True, timeout=30)
    return time.perf_counter() - started


async def ours(port: int, sink: Sink) -> dict[str, float]:
    slots = Slots(limit=3)
    started = time.perf_counter()
    results = await relay_port(port, slots=slots, command_timeout=30, port_deadline=180)
    verdicts_at = time.perf_counter() - started
    tags = {r.tag for r in results.values() if r.verdict is Verdict.OPEN and r.tag}
    arrived = await sink.wait_for(tags, 10) if tags else set()
    confirmed_after = time.perf_counter() - started - verdicts_at
    return {"seconds": verdicts_at, "connections": slots.total, "open": len(tags), "arrived": len(arrived),
            "confirm_after": confirmed_after if tags else 0.0}


async def main(rounds: int) -> int:
    base = Path(tempfile.mkdtemp(prefix="sysb"))
    sink = Sink(PROBE_DOMAIN)
    await sink.start("127.0.0.1", 0)
    instances = {kind: await asyncio.to_thread(start_postfix, base, kind, sink_port=sink.port)
                 for kind in ("open", "closed")}
    failures = 0
    try:
        startup = nmap_startup()
        print(f"nmap: {'not installed (no baseline)' if startup is None else f'start-up alone {startup:.3f} s'}")
        for kind, instance in instances.items():
            runs = [await ours(instance.port, sink) for _ in range(rounds)]
            nmap_runs = [nmap_seconds(instance.port) for _ in range(rounds)]
            ours_s = statistics.median(r["seconds"] for r in runs)
            line = (f"{kind:6} postfix: ours {ours_s:.3f} s (median of {rounds}), "
                    f"{runs[-1]['connections']} connections, {runs[-1]['open']} open")
            if kind == "open":
                confirm = statistics.median(r["confirm_after"] for r in runs)
                line += f", {runs[-1]['arrived']}/{runs[-1]['open']} reached the sink {confirm:.3f} s later"
                failures += confirm > 2.0
            print(line)
            if nmap_runs[0] is not None:
                nmap_s = statistics.median(n[0] for n in nmap_runs)  # type: ignore[index]
                ratio = ours_s / nmap_s
                goal = 0.25 if kind == "closed" else 1.5
                verdict = "ok" if ratio <= goal else "MISSED"
                failures += ratio > goal
                print(f"{'':6}          nmap {nmap_s:.3f} s ({nmap_runs[-1][1]}); ratio ours/nmap {ratio:.3f} "
                      f"(goal <= {goal}) {verdict}")
    finally:
        for instance in instances.values():
            instance.stop()
        await sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(max(1, min(parser.parse_args().rounds, 20)))))
