"""Shared fixtures: settings on a temporary database, the app with its lifespan, loopback ports in every state.

Tests only ever touch loopback. A test that needs a real server (chromium, postfix, ...) calls
`support.require_binary`; anything else it needs and may not find here goes through `support.skip_or_fail`. Both
fail under CI=true and skip otherwise.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest
from support import free_port, quiet_dns, running_app, skip_or_fail

from app.config import Settings


@pytest.fixture
def refused_port() -> int:
    """A loopback port where nothing listens."""
    return free_port()


@pytest.fixture
def open_port() -> Iterator[int]:
    """A loopback port that accepts connections (and then closes them)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that drops new connection attempts, like a firewall that drops SYNs.

    A listening socket whose accept queue is full (backlog 0, never accepted, filled by our own connections)
    makes the kernel drop further SYNs, so connect() hangs until the client's timeout.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):  # bounded: the queue fills after one or two
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


STORES = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "both_stores: run the test on SQLite and on PostgreSQL (fixture store_kind)")


def pytest_generate_tests(metafunc):
    """A test (or module: pytestmark) marked both_stores runs once per store, when it uses one (store_kind: through
    `settings`, `store` or `store_location`). Its PostgreSQL database is a fresh one of the session's cluster."""
    if metafunc.definition.get_closest_marker("both_stores") and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", STORES, indirect=True)


@pytest.fixture
def store_kind(request) -> str:
    """`sqlite` unless the test is marked both_stores (then each in turn)."""
    return getattr(request, "param", "sqlite")


def new_location(request, kind: str, path: Path) -> str:
    """A fresh database: the SQLite file `path`, or a new database of the session's PostgreSQL (its URL)."""
    if kind == "postgresql":
        return request.getfixturevalue("postgres_server").new_database()
    return str(path)


@pytest.fixture
def store_location(request, store_kind: str, tmp_path: Path) -> str:
    """Where the `store` fixture's database is (a SQLite path or a PostgreSQL URL), for a second Store on it."""
    return new_location(request, store_kind, tmp_path / "db.sqlite")


@pytest.fixture
def settings(request, store_kind: str, tmp_path: Path, refused_port: int, open_port: int) -> Settings:
    location = new_location(request, store_kind, tmp_path / "test.db")
    return Settings(
        database_url=location if store_kind == "postgresql" else f"sqlite:///{location}",
        public_url="http://testserver",
        allow_networks=["127.0.0.0/8"],
        relay_ports=[refused_port],
        proxy_ports=[open_port],
        connect_timeout=2,
        audit_deadline=20,
        target_cooldown=0,  # the cooldown tests turn it on
        verification_check_interval=0,  # the limit tests turn it on
        # the blocklist service (on by default) asks a loopback server that knows no name: never a DNS query off
        # the machine; the blocklist tests point it at their own server (tests/fakes/dns.py)
        dns_servers=[quiet_dns()],
        blocklist_timeout=1,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def store(store_location: str):
    from app.store import Store

    store = Store(store_location)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def sink():
    """Our own sink (app.probes.sink) on a free loopback port, for relayed probe messages."""
    from support import PROBE_DOMAIN

    from app.probes.sink import Sink

    sink = Sink(PROBE_DOMAIN)
    await sink.start("127.0.0.1", 0)
    yield sink
    await sink.stop()


def require_postfix() -> None:
    """Real Postfix needs its package and root: fail under CI, skip elsewhere."""
    from servers.postfix import PostfixUnavailable, postfix_available
    from support import require_binary

    require_binary("/usr/sbin/postfix", "postfix")
    try:
        postfix_available()
    except PostfixUnavailable as exc:
        skip_or_fail(str(exc))


@pytest.fixture
def postfix_ok() -> None:
    require_postfix()


def require_proxy(binary: str) -> None:
    """A real proxy (squid, danted, microsocks, tinyproxy) needs its package and root: fail under CI, skip elsewhere."""
    from servers.proxies import PACKAGES, ProxyUnavailable, available, resolve_binary
    from support import require_binary

    path = resolve_binary(binary)
    require_binary(path, PACKAGES.get(path, binary))
    try:
        available(path)
    except ProxyUnavailable as exc:
        skip_or_fail(str(exc))


@pytest.fixture
def proxies(tmp_path: Path):
    """Real proxies on 127.0.0.1 started on demand, each in its own folder under tmp_path/proxies:
    `proxies.squid("open" | "closed" | "ssl_only", ssl_ports=[...])`, `proxies.dante("open" | "closed")`,
    `proxies.microsocks(user, password)`, `proxies.tinyproxy("open" | "restricted")`,
    `proxies.apache("open" | "stock_connect" | "restricted" | "reverse")`, `proxies.nginx("forward" | "site")`,
    `proxies.privoxy("open" | "restricted")`, `proxies.haproxy(backend_port)` return a ProxyInstance
    (.port, .log(), ...). A missing proxy fails the test under CI=true and skips it otherwise. All instances are
    stopped (in parallel) after the test. See tests/servers/proxies.py."""
    from servers.proxies import ProxySet

    pool = ProxySet(tmp_path / "proxies", on_unavailable=skip_or_fail)
    yield pool
    pool.stop_all()


def pytest_sessionstart(session):
    """The tests read the compiled catalogues: compile them when a .po is newer than its .mo (make test does too)."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    for po in (Path(__file__).resolve().parent.parent / "locales").glob("*/LC_MESSAGES/messages.po"):
        mo = po.with_suffix(".mo")
        if not mo.exists() or mo.stat().st_mtime < po.stat().st_mtime:
            with po.open("rb") as source:
                catalog = read_po(source)
            with mo.open("wb") as target:
                write_mo(target, catalog)


@pytest.fixture
def mta(tmp_path: Path, sink):
    """Real Exim, Sendmail or OpenSMTPD (extracted packages, servers/mta.py) on 127.0.0.1, relaying to `sink`:
    `await mta("exim" | "sendmail" | "opensmtpd", kind)`; each must leave no process behind."""
    from servers import exim, opensmtpd, sendmail
    from servers.mta import MtaInstance, MtaUnavailable

    starters = {"exim": exim.start_exim, "sendmail": sendmail.start_sendmail, "opensmtpd": opensmtpd.start_opensmtpd}
    started: list[MtaInstance] = []

    async def start(name: str, kind: str) -> MtaInstance:
        try:
            instance = await asyncio.to_thread(starters[name], tmp_path, kind, sink_port=sink.port)
        except MtaUnavailable as exc:
            skip_or_fail(str(exc))
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
        assert not instance.pids(), f"{instance.name} {instance.kind} left processes behind"


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL on 127.0.0.1 (servers/postgres.py), one cluster for the session in a temporary folder of
    its own: `.dsn` (postgresql://app:PASSWORD@127.0.0.1:PORT/app), `.new_database()` for a fresh database,
    `.admin_dsn`. A missing package (or, as root, a missing postgres user) fails under CI=true and skips
    otherwise. Stopped at the end of the session, leaving no process and no folder."""
    from servers.postgres import PostgresUnavailable, start_postgres

    try:
        instance = start_postgres()
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def redis_server():
    """Debian's redis-server on 127.0.0.1 (servers/redis.py), one for the session, with a password and no
    persistence: `.url` (redis://:PASSWORD@127.0.0.1:PORT/0), `.url_for(db)`. A missing package fails under
    CI=true and skips otherwise. Stopped at the end of the session, leaving no process and no folder."""
    import secrets

    from servers.redis import RedisUnavailable, start_redis

    try:
        instance = start_redis(password=secrets.token_urlsafe(12))
    except RedisUnavailable as exc:
        skip_or_fail(str(exc))
    yield instance
    instance.stop()
