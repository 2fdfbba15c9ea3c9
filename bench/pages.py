"""Pages benchmark: how fast the site serves a finished audit and its everyday pages, beside a minimal FastAPI app.

    make bench-pages      (or: .venv/bin/python bench/pages.py [--rounds 3] [--concurrency 8])

The site runs as an operator runs it (`python -m app.cli serve`: one uvicorn process, SQLite in a temporary
directory), seeded with one finished 45-check audit stored through the Store API: relay port 25 (22 variants, a
Postfix that relays some of them: a shared greeting and EHLO per session, then MAIL, RCPT, DATA and their
replies), relay port 587 (22 variants, login required) and an open proxy on port 8080 (the request and the answer
with its headers). A minimal FastAPI app (one small JSON route, one small HTML route) runs beside it, as one
uvicorn process on h11 (the site's is h11 with its connection guards), in the same run. `ab` (apache2-utils)
loads each URL with a fixed number of requests at a fixed concurrency; each round measures every site route right
after its baseline on the minimal app. Printed: the medians of the rounds' requests/s per route and of each
route's ratio against the minimal app (JSON routes against its JSON route, pages against its HTML route), each
ratio from a pair measured back to back (the machine's load changes between rounds; a pair shares it). A missed
goal exits 1.
The audit's rows are stored as a store without a deriver stores them (as before schema 6, so that any checkout
can seed them): the warm-up's first read of each route makes what the site shows of them and stores it, as after
an upgrade; the rounds then measure the steady state.
Goals (issue 15): GET /api/v1/audits/{id} >= 0.1x, GET / and GET /guides/postfix >= 0.5x.
Set SYS_ROOT to measure another checkout (e.g. SYS_ROOT=/work/wt-pages-base for the numbers before a change).
Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(os.environ.get("SYS_ROOT") or Path(__file__).resolve().parent.parent)
sys.path[:0] = [str(ROOT)]

from app.probes.fingerprint import identify  # noqa: E402
from app.store import Audit, Store, new_id  # noqa: E402
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict  # noqa: E402

GOALS = {"audit JSON": 0.1, "home /": 0.5, "guide /guides/postfix": 0.5}
MINIMAL_APP = textwrap.dedent('''
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    app = FastAPI()

    @app.get("/json")
    async def small_json() -> dict[str, object]:
        return {"status": "ok", "items": [1, 2, 3], "name": "minimal"}

    @app.get("/html", response_class=HTMLResponse)
    async def small_html() -> str:
        return "<!doctype html><html><head><title>minimal</title></head><body><p>Hello.</p></body></html>"
''')
POSTFIX_EHLO = ["250-mail.example.org", "250-PIPELINING", "250-SIZE 10240000", "250-VRFY", "250-ETRN",
                "250-STARTTLS", "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250-SMTPUTF8",
                "250 CHUNKING"]


def _line(t: float, direction: str, text: str) -> TranscriptLine:
    return TranscriptLine(t=round(t, 4), dir=direction, text=text)


def _opening(key: str, port: int, greeting: str, ehlo: list[str]) -> Opening:
    lines = [_line(0.0, "info", f"connected to 192.0.2.10:{port}"),
             _line(0.0123, "in", f"220-mail.example.org {greeting}"),
             _line(0.0124, "in", "220-This system is for authorised use only; connections are logged."),
             _line(0.0125, "in", "220 mail.example.org"),
             _line(0.0131, "out", "EHLO probe.secure-your-server.example")]
    lines += [_line(0.0189 + i / 10000, "in", text) for i, text in enumerate(ehlo)]
    return Opening(key, lines)


def _relay_row(port: int, number: int, opening: Opening, verdict: str, reason: str, replies: list[str],
               fingerprint: dict[str, str | None] | None) -> CheckResult:
    sender = f"<probe{number}@stranger.example>"
    own = [_line(0.05, "out", "RSET"), _line(0.051, "in", "250 2.0.0 Ok"),
           _line(0.052, "out", f"MAIL FROM:{sender}"), _line(0.053, "in", replies[0]),
           _line(0.054, "out", f"RCPT TO:<target{number}@elsewhere.example>"), _line(0.061, "in", replies[1])]
    if len(replies) > 2:
        own += [_line(0.062, "out", "DATA"), _line(0.063, "in", replies[2]),
                _line(0.064, "out", f"(message with proof tag, {600 + number} bytes)"),
                _line(0.071, "in", replies[3])]
    own.append(_line(0.08, "info", f"variant {number}: {reason}"))
    return CheckResult(service="relay", host="192.0.2.10", port=port, name=f"relay.v{number}",
                       verdict=Verdict(verdict), reason=reason, confirmed=reason == "delivered",
                       fingerprint=fingerprint, transcript=[*opening.lines, *own], opening=opening,
                       detail=f"port {port}, variant {number}",
                       tag=f"tag{port}v{number}" if len(replies) > 2 else None)


def relay_rows(port: int) -> list[CheckResult]:
    """22 variants in sessions of 8 (a shared opening each): port 25 relays every third variant, 587 wants a login."""
    greeting = "ESMTP Postfix (Debian/GNU)" if port == 25 else "ESMTP Postfix (submission)"
    fingerprint = identify(f"mail.example.org {greeting}")
    rows = []
    for number in range(1, 23):
        opening = _opening(f"{port}:{(number - 1) // 8}", port, greeting, POSTFIX_EHLO + (["250-AUTH PLAIN LOGIN"]
                                                                                        if port == 587 else []))
        if port == 587:
            rows.append(_relay_row(port, number, opening, "auth_required", "auth_required_for_relay",
                                   ["250 2.1.0 Ok", "530 5.7.0 Must issue a STARTTLS command first"], fingerprint))
        elif number % 3 == 0:
            rows.append(_relay_row(port, number, opening, "open", "delivered",
                                   ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                                    f"250 2.0.0 Ok: queued as 4F3A21C0D{number:02d}"], fingerprint))
        else:
            rows.append(_relay_row(port, number, opening, "closed", "relay_denied",
                                   ["250 2.1.0 Ok", "554 5.7.1 <target@elsewhere.example>: Relay access denied"],
                                   fingerprint))
    return rows


def proxy_row() -> CheckResult:
    lines = [_line(0.0, "info", "connected to 192.0.2.10:8080"),
             _line(0.001, "out", "GET http://canary.secure-your-server.example/canary/abc123 HTTP/1.1"),
             _line(0.001, "out", "Host: canary.secure-your-server.example"),
             _line(0.2, "in", "HTTP/1.1 200 OK"), _line(0.2, "in", "Date: Mon, 30 Nov 2026 12:00:00 GMT"),
             _line(0.2, "in", "Content-Type: text/plain"), _line(0.2, "in", "Content-Length: 33"),
             _line(0.2, "in", "Via: 1.1 proxy.example.org"), _line(0.2, "in", "X-Cache: MISS from proxy"),
             _line(0.2, "in", "Connection: close"), _line(0.21, "in", "token-abc123-def456-0123456789abcdef"),
             _line(0.21, "info", "our canary token came back through the port")]
    return CheckResult(service="proxy", host="192.0.2.10", port=8080, name="proxy.http_get",
                       verdict=Verdict.OPEN, reason="token_returned", fingerprint=None, transcript=lines,
                       detail="the proxy fetched our test page")


async def seed(db: Path) -> str:
    """One finished 45-check audit, stored through the Store API (as the auditor stores it)."""
    store = Store(str(db))
    await store.open()
    try:
        now = time.time()
        audit = Audit(id=new_id(), created_at=now - 60, status="running", target="self", requester="192.0.2.10",
                      hosts=["192.0.2.10"], services=["relay", "proxy"], planned=45, engine_version="bench",
                      started_at=now - 59)
        await store.create_audit(audit, ["192.0.2.10"])
        rows = [*relay_rows(25), *relay_rows(587), proxy_row()]
        for seq, result in enumerate(rows, start=1):
            await store.add_check(audit.id, seq, result)
        await store.finish_audit(audit.id, "done", {"relay": "open", "proxy": "open"})
        return audit.id
    finally:
        await store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {seconds} s: {log.read_text()[-2000:]}")


@contextmanager
def served(command: list[str], cwd: Path, env: dict[str, str], ready: str, log: Path) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(ready, process, log)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def ab(url: str, requests: int, concurrency: int) -> float:
    """Requests per second; every answer must be a 200 (ab counts another status as non-2xx)."""
    out = subprocess.run(["ab", "-q", "-n", str(requests), "-c", str(concurrency), "-s", "30", url],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"ab {url} failed: {out.stderr[-500:]}")
    if "Non-2xx responses" in out.stdout:
        raise SystemExit(f"ab {url}: answers other than 200:\n{out.stdout}")
    found = re.search(r"Requests per second:\s+([\d.]+)", out.stdout)
    if found is None:
        raise SystemExit(f"ab {url}: no rate in its output:\n{out.stdout}")
    return float(found.group(1))


BASELINE = {"audit JSON": "minimal JSON", "result page": "minimal HTML", "home /": "minimal HTML",
            "guide /guides/postfix": "minimal HTML"}


def measure(routes: dict[str, tuple[str, int]], rounds: int,
            concurrency: int) -> tuple[dict[str, float], dict[str, float]]:
    """Medians of requests/s per route, and of each site route's ratio against its baseline measured just before
    it in the same round (the machine's load changes between rounds; a pair measured back to back shares it)."""
    for url, _count in routes.values():  # warm-up: imports, caches, the first read of each route
        ab(url, 20, 2)
    rates: dict[str, list[float]] = {name: [] for name in routes}
    ratios: dict[str, list[float]] = {name: [] for name in routes if name in BASELINE}
    for _round in range(rounds):
        for name in ratios:
            baseline = BASELINE[name]
            base = ab(routes[baseline][0], routes[baseline][1], concurrency)
            rate = ab(routes[name][0], routes[name][1], concurrency)
            rates[baseline].append(base)
            rates[name].append(rate)
            ratios[name].append(rate / base)
    return ({name: statistics.median(values) for name, values in rates.items() if values},
            {name: statistics.median(values) for name, values in ratios.items()})


def run(rounds: int, concurrency: int, only: list[str]) -> bool:
    if shutil.which("ab") is None:
        raise SystemExit("ab is missing: apt-get install apache2-utils")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "site.db"
        audit_id = asyncio.run(seed(db))
        (folder / "minimal.py").write_text(MINIMAL_APP)
        site_port, minimal_port = free_port(), free_port()
        site, minimal = f"http://127.0.0.1:{site_port}", f"http://127.0.0.1:{minimal_port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SECURE_DATABASE_URL": f"sqlite:///{db}",
               "SECURE_PUBLIC_URL": site, "SECURE_LOG_LEVEL": "WARNING", "SECURE_TARGET_COOLDOWN": "0"}
        python = sys.executable
        with served([python, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(site_port)], ROOT,
                    env, site + "/healthz", folder / "site.log"), \
             served([python, "-m", "uvicorn", "minimal:app", "--host", "127.0.0.1", "--port", str(minimal_port),
                     "--http", "h11", "--no-access-log", "--log-level", "warning"], folder,
                    {**os.environ, "PYTHONPATH": str(folder)}, minimal + "/json", folder / "minimal.log"):
            routes = {
                "minimal JSON": (minimal + "/json", 2000), "minimal HTML": (minimal + "/html", 2000),
                "audit JSON": (f"{site}/api/v1/audits/{audit_id}", 400),
                "result page": (f"{site}/audits/{audit_id}", 400),
                "home /": (site + "/", 2000), "guide /guides/postfix": (site + "/guides/postfix", 1000),
            }
            if only:
                routes = {name: route for name, route in routes.items() if name.startswith("minimal")
                          or any(word in name.lower() for word in only)}
            rates, ratios = measure(routes, rounds, concurrency)
    return report(rates, ratios, rounds, concurrency)


def report(rates: dict[str, float], ratios: dict[str, float], rounds: int, concurrency: int) -> bool:
    print(f"{ROOT}: medians of {rounds} rounds, concurrency {concurrency}, one uvicorn process each")
    for name in ("minimal JSON", "minimal HTML"):
        if name in rates:
            print(f"  {name:<24} {rates[name]:8.1f} req/s")
    failed = []
    for name, ratio in ratios.items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else (f"goal >= {goal}x: " + ("met" if ratio >= goal else "NOT MET"))
        if goal is not None and ratio < goal:
            failed.append(name)
        print(f"  {name:<24} {rates[name]:8.1f} req/s  {ratio:6.3f}x {BASELINE[name]}  {verdict}")
    print("all goals met" if not failed else f"goals not met: {', '.join(failed)}")
    return not failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--only", default="", help="measure only the routes whose names contain these words "
                        "(comma-separated: json,result,home,guide), beside the minimal app")
    args = parser.parse_args()
    sys.exit(0 if run(args.rounds, args.concurrency, [word.lower() for word in args.only.split(",") if word]) else 1)
