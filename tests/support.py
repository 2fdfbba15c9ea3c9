"""Helpers for tests: real-binary requirement, free ports, the app with its lifespan, waiting for audits."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, NoReturn

import httpx
import pytest
from ports import free_port  # the tests import it from here too

from app.config import Settings

if TYPE_CHECKING:
    from fakes.dns import FakeDns
from app.main import create_app
from app.probes import smtp

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SYS_ARTIFACTS", ROOT / "artifacts"))


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> NoReturn:
    """The one way a test gives up because something it needs (a real server, a privilege, a loopback port) is
    missing here: under CI=true that is a broken CI, so the test fails; elsewhere it skips."""
    if under_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_binary(path: str, package: str) -> str:
    found = shutil.which(path)
    if found:
        return found
    skip_or_fail(f"{path} is missing: install the Debian package {package} (make test does it as root)")


class ThreadedServer:
    """An asyncio fake (an async context manager with .port) served from its own thread and event loop."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            async with self.server:
                self._ready.set()
                await self._stop.wait()
        self.loop.run_until_complete(main())

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    @property
    def port(self) -> int:
        return self.server.port


_quiet_dns: ThreadedServer | None = None


def quiet_dns() -> str:
    """`127.0.0.1:PORT` of a DNS server that knows no name (NXDOMAIN at once), started once per test run in a thread
    of its own. Every test audit's blocklist queries go there unless the test names its own server: no query ever
    leaves the machine, and none waits for a time limit (a dead port did: dnspython misses the ICMP refusal)."""
    global _quiet_dns
    if _quiet_dns is None:
        from fakes.dns import FakeDns

        _quiet_dns = ThreadedServer(FakeDns()).__enter__()
        atexit.register(_quiet_dns.__exit__)  # stopped with the test run
    return f"127.0.0.1:{_quiet_dns.port}"


def require_loopback_dns(env: dict[str, str]) -> dict[str, str]:
    """A process the tests start asks DNS on loopback only (SECURE_DNS_SERVERS, which the blocklists use)."""
    import ipaddress

    servers = [s.strip() for s in env.get("SECURE_DNS_SERVERS", "").split(",") if s.strip()]
    assert servers and all(ipaddress.ip_address(s.rsplit(":", 1)[0].strip("[]")).is_loopback for s in servers), \
        f"a test process would ask DNS off the machine: SECURE_DNS_SERVERS={env.get('SECURE_DNS_SERVERS')!r}"
    return env

@asynccontextmanager
async def running_app(settings: Settings, peer: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, and a client whose requests come from `peer`."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), audit_worker(app):
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@asynccontextmanager
async def audit_worker(app) -> AsyncIterator[None]:
    """With PostgreSQL the app defers its audits to the job queue (app/jobs.py): a worker runs them here, in the
    test's event loop, as `secure-your-server worker` does in its own process. Nothing with SQLite."""
    auditor = app.state.sys.auditor
    queue = auditor.jobs
    if queue is None:
        yield
        return
    queue.register(auditor.run_job)
    worker = asyncio.create_task(queue.work(auditor.settings.max_running_audits, "test-worker", signals=False))
    try:
        yield
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def wait_done(client: httpx.AsyncClient, audit_id: str, seconds: float = 20.0) -> dict:
    """Poll an audit until it has finished (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        data = (await client.get(f"/api/v1/audits/{audit_id}")).json()
        if data["status"] not in ("queued", "running"):
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"audit {audit_id} still {data['status']} after {seconds} s")
        await asyncio.sleep(0.05)


class ServedSite:
    """The real site in its own process (`secure-your-server serve`), as an operator runs it."""

    def __init__(self, tmp_path: Path, env: dict[str, str], port: int | None = None,
                 open_files: int | None = None, host: str = "127.0.0.1") -> None:
        """`open_files`: the process's RLIMIT_NOFILE (as `ulimit -n`), to show what a small one does; `host`: the
        address it serves on (a test's own namespace's peer address, servers/netns.py), loopback by default."""
        import subprocess
        import sys

        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.db = tmp_path / "site.db"
        self.log = tmp_path / "site.log"
        # the blocklist service asks the quiet loopback DNS server unless the test names its own: never a query off
        # the machine
        full_env = require_loopback_dns({**os.environ, "SECURE_DATABASE_URL": f"sqlite:///{self.db}",
                                         "SECURE_PUBLIC_URL": self.url, "SECURE_DNS_SERVERS": quiet_dns(),
                                         "SECURE_BLOCKLIST_TIMEOUT": "1", **env})
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", host, "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else lambda: _limit_files(open_files))
        self._wait_ready()

    def _wait_ready(self, seconds: float = 20.0) -> None:
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the site exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the site did not start within {seconds} s: {self.log.read_text()[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=15)
        self._log_file.close()

    def __enter__(self) -> "ServedSite":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AuditWorker:
    """`secure-your-server worker` in its own process, as an operator runs it."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        """`env` on top of ours (SECURE_DATABASE_URL=postgresql://...); its log in `folder` (made here). Its
        instance id (audits.owner) is read from its log: `instance`; SECURE_LOG_LEVEL must let INFO through."""
        import subprocess
        import sys

        folder.mkdir()
        self.log = folder / "worker.log"
        self._log_file = open(self.log, "wb")
        full_env = require_loopback_dns({**os.environ, "SECURE_DNS_SERVERS": quiet_dns(),
                                         "SECURE_BLOCKLIST_TIMEOUT": "1", **env})
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT,
                                        env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.instance = self._wait_started()

    def _wait_started(self, seconds: float = 30.0) -> str:
        import json
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the worker exited: {self.log.read_text()[-2000:]}"
            for line in self.log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == "worker.started":
                        return str(entry["instance"])
            time.sleep(0.1)
        raise AssertionError(f"the worker did not start: {self.log.read_text()[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
        self._log_file.close()


    def __enter__(self) -> "AuditWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _limit_files(count: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def wait_done_sync(url: str, audit_id: str, seconds: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + seconds
    while True:
        data = httpx.get(f"{url}/api/v1/audits/{audit_id}", timeout=5).json()
        if data["status"] not in ("queued", "running"):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"audit {audit_id} still {data['status']} after {seconds} s")
        time.sleep(0.1)


# --- driving the relay checks of one port, as the audit does ------------------------------------------------
PROBE_DOMAIN = "sink.test.example"


def relay_options(**overrides) -> smtp.RelayOptions:
    values = dict(audit_id="AUDIT", site_url="http://site.test", probe_domain=PROBE_DOMAIN,
                  probe_helo="probe.test.example", connect_timeout=2, command_timeout=2, port_deadline=20,
                  greylist_max_wait=0, audited_domain=None)
    values.update(overrides)
    return smtp.RelayOptions(**values)


class Slots:
    """The per-host limit as the audit gives it, recording the most connections open at once."""

    def __init__(self, limit: int = 3) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.now = self.most = self.total = 0

    @contextlib.asynccontextmanager
    async def __call__(self):
        async with self.semaphore:
            self.now += 1
            self.total += 1
            self.most = max(self.most, self.now)
            try:
                yield
            finally:
                self.now -= 1


async def relay_port(port: int, slots: Slots | None = None, **overrides):
    results = {}

    async def emit(result):
        assert result.name not in results, f"{result.name} emitted twice"
        results[result.name] = result

    await smtp.run_port(emit, slots or Slots(), "127.0.0.1", port, relay_options(**overrides))
    assert sorted(results) == sorted(f"relay.{v}" for v in smtp.VariantId)  # every variant, exactly once
    return results




# --- driving the proxy checks of one port, with our canaries on loopback -------------------------------------
@contextlib.asynccontextmanager
async def canaries(name: str | None = "localhost"):
    """The SMTP, HTTP and TLS canaries on free loopback ports, as CanaryTargets."""
    from app.probes.canary import Canary, HttpCanary, SmtpCanary, self_signed_context
    from app.probes.proxy import CanaryTargets

    canary = Canary("test-secret")
    smtp_canary, http_canary, tls_canary = SmtpCanary(canary), HttpCanary(canary, "http"), HttpCanary(canary, "tls")
    smtp_port = await smtp_canary.start("127.0.0.1", 0)
    http_port = await http_canary.start("127.0.0.1", 0)
    tls_port = await tls_canary.start("127.0.0.1", 0, self_signed_context())
    try:
        yield CanaryTargets(canary=canary, address="127.0.0.1", name=name, http_base=f"http://127.0.0.1:{http_port}",
                            smtp_port=smtp_port, tls_port=tls_port)
    finally:
        for server in (smtp_canary, http_canary, tls_canary):
            await server.stop()


async def proxy_port(port: int, targets, slots: "Slots | None" = None, host: str = "127.0.0.1", **overrides):
    from app.probes import proxy

    values = dict(connect_timeout=2.0, step_timeout=2.0)
    values.update(overrides)
    results = {}

    async def emit(result):
        assert result.name not in results, f"{result.name} emitted twice"
        results[result.name] = result

    options = proxy.ProxyOptions(targets=targets, **values)
    await proxy.run_port(emit, slots or Slots(), host, port, options)
    expected = {f"proxy.{c.id}" for c in proxy.planned_checks(host, port, targets, options.wingate_ports)}
    assert set(results) == expected  # every planned check, exactly once
    return results


async def verified(client: httpx.AsyncClient, dns: "FakeDns", domain: str) -> str:
    """Prove `domain` through the site's DNS TXT verification, answered by the loopback fake DNS; its id."""
    created = (await client.post("/api/v1/verifications", json={"domain": domain})).json()
    dns.set(created["dns"]["name"], "TXT", [f'"{created["dns"]["value"]}"'])
    check = (await client.post(f"/api/v1/verifications/{created['id']}/check")).json()
    assert check["status"] == "verified", check
    return created["id"]
