"""The PostgreSQL and Redis fixtures (servers/postgres.py, servers/redis.py, the postgres_server and redis_server
fixtures of conftest.py) against the real servers: data goes in and comes back through the DSN/URL with the real
clients, only 127.0.0.1 is served, a wrong password is refused, instances run side by side, and stop() leaves no
process, no port and no folder behind; the system's own PostgreSQL and Redis services are never started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio
import redis.exceptions

from servers import daemon
from servers.postgres import PostgresInstance, start_postgres
from servers.processes import accepts, alive, identities, port_listening, wait_until
from servers.redis import RedisInstance, start_redis

SYSTEM_PORTS = (5432, 6379)  # where the system's postgresql and redis-server services would listen
DAEMON_NAMES = ("postgres", "redis-server")


def _name_and_parent(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of a live process; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return stat[stat.find("(") + 1:stat.rfind(")")], int(fields[1])


def _system_daemons() -> list[tuple[int, str]]:
    """postgres and redis-server processes whose topmost such ancestor is a child of init: a system service (or
    a daemonised leftover), never an instance a test process started as its own child."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        info = _name_and_parent(pid)
        if info is None or info[0] not in DAEMON_NAMES:
            continue
        top = pid
        for _ in range(16):  # bounded: climb to the topmost postgres/redis-server ancestor
            parent = _name_and_parent(top)
            if parent is None or (_name_and_parent(parent[1]) or ("", 0))[0] not in DAEMON_NAMES:
                break
            top = parent[1]
        parent = _name_and_parent(top)
        if parent is not None and parent[1] == 1:
            found.append((pid, info[0]))
    return found


def _assert_gone(instance: daemon.DaemonInstance, known: list[tuple[int, str]]) -> None:
    assert alive(known) == []
    assert instance.pids() == []
    assert not port_listening(instance.port)
    assert not instance.directory.exists()


# --- PostgreSQL ------------------------------------------------------------------------------------------------

def test_postgres_table_round_trip_through_the_dsn(postgres_server: PostgresInstance):
    table = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text NOT NULL)")
        conn.execute(f"INSERT INTO {table} (note) VALUES (%s), (%s)", ("één", "two"))
    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:  # another session sees it committed
        rows = conn.execute(f"SELECT note FROM {table} ORDER BY id").fetchall()
        who = conn.execute("SELECT current_user, current_database(), inet_server_addr()::text").fetchone()
    assert rows == [("één",), ("two",)]
    assert who == ("app", "app", "127.0.0.1/32")
    assert postgres_server.dsn.startswith(f"postgresql://app:{postgres_server.password}@127.0.0.1:")
    assert postgres_server.version.startswith("postgres (PostgreSQL) ")


async def test_postgres_async_client_and_listen_notify(postgres_server: PostgresInstance):
    channel = f"c_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(postgres_server.dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {channel}")
        async with await psycopg.AsyncConnection.connect(postgres_server.dsn, autocommit=True) as sender:
            await sender.execute("SELECT pg_notify(%s, %s)", (channel, "row 7"))
        notifies = listener.notifies(timeout=5, stop_after=1)
        received = [(n.channel, n.payload) async for n in notifies]
    assert received == [(channel, "row 7")]


def test_postgres_new_database_is_separate(postgres_server: PostgresInstance):
    dsn = postgres_server.new_database()
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:
        found = conn.execute("SELECT to_regclass('only_here') IS NOT NULL").fetchone()
    assert found == (False,)


def test_postgres_listens_on_127_0_0_1_only(postgres_server: PostgresInstance):
    assert postgres_server.listeners() == [("127.0.0.1", postgres_server.port)]
    assert accepts("127.0.0.1", postgres_server.port)
    assert not accepts("127.0.0.2", postgres_server.port)  # would connect if bound to 0.0.0.0
    if os.geteuid() == 0:  # PostgreSQL refuses root: the fixture runs it as the postgres user
        assert Path(f"/proc/{postgres_server.pid}").stat().st_uid != 0


def test_postgres_refuses_a_wrong_password(postgres_server: PostgresInstance):
    wrong = postgres_server.dsn.replace(f":{postgres_server.password}@", ":not-the-password@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    no_password = f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(no_password, connect_timeout=5, password="")
    with psycopg.connect(postgres_server.admin_dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)


def test_two_postgres_instances_side_by_side_then_stopped_clean(postgres_server: PostgresInstance):
    second = start_postgres(user="other", password="pw-two", database="other")
    try:
        assert second.port != postgres_server.port
        with psycopg.connect(second.dsn, connect_timeout=5) as conn:
            conn.execute("CREATE TABLE second_only (x int)")
        with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT to_regclass('second_only') IS NULL").fetchone() == (True,)
        pids = second.pids()
        assert len(pids) > 1  # the postmaster and its children (checkpointer, walwriter, ...)
        known = identities(pids)
    finally:
        second.stop()
    _assert_gone(second, known)
    second.stop()  # idempotent
    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:  # the other one is untouched
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_stop_kills_a_hung_server_and_its_children(monkeypatch):
    monkeypatch.setattr(daemon, "STOP_TIMEOUT", 0.5)
    instance = start_postgres()
    try:
        known = identities(instance.pids())
        assert len(known) > 1
        for pid, _ in known:  # frozen: the postmaster ignores its fast shutdown, its children (each in a session
            os.kill(pid, signal.SIGSTOP)  # of its own, outside the group) do not notice it is gone
    finally:
        instance.stop()
    _assert_gone(instance, known)


# --- Redis -----------------------------------------------------------------------------------------------------

def test_redis_round_trip_through_the_url(redis_server: RedisInstance):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        key = f"k-{uuid.uuid4().hex}"
        assert client.set(key, "värde") is True
        assert client.get(key) == "värde".encode()
        assert client.incr(f"{key}-n") == 1
        assert client.config_get("save") == {"save": ""}  # no persistence
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    finally:
        client.close()
    assert redis_server.url == f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"


async def test_redis_asyncio_pub_sub(redis_server: RedisInstance):
    client = redis.asyncio.Redis.from_url(redis_server.url_for(1), socket_timeout=5)
    try:
        channel = f"ch-{uuid.uuid4().hex}"
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        assert await client.publish(channel, "row 7") == 1
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        await pubsub.aclose()
    finally:
        await client.aclose()
    assert message is not None and message["data"] == b"row 7"


def test_redis_listens_on_127_0_0_1_only(redis_server: RedisInstance):
    assert redis_server.listeners() == [("127.0.0.1", redis_server.port)]
    assert not accepts("127.0.0.2", redis_server.port)


def test_redis_refuses_a_wrong_or_missing_password(redis_server: RedisInstance):
    wrong = redis_server.url.replace(f":{redis_server.password}@", ":not-the-password@")
    for url in (wrong, f"redis://127.0.0.1:{redis_server.port}/0"):
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                client.get("anything")
        finally:
            client.close()


def test_two_redis_instances_side_by_side_then_stopped_clean(redis_server: RedisInstance):
    second = start_redis()  # without a password
    try:
        assert second.port != redis_server.port
        assert second.url == f"redis://127.0.0.1:{second.port}/0"
        one = redis.Redis.from_url(second.url, socket_timeout=5)
        other = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        one.set("only-in-second", 1)
        assert other.exists("only-in-second") == 0
        one.close()
        other.close()
        known = identities(second.pids())
        assert known
    finally:
        second.stop()
    _assert_gone(second, known)
    second.stop()  # idempotent


# --- both ------------------------------------------------------------------------------------------------------

def test_no_system_service_was_started(postgres_server: PostgresInstance, redis_server: RedisInstance):
    assert _system_daemons() == []
    for port in SYSTEM_PORTS:
        assert port in (postgres_server.port, redis_server.port) or not port_listening(port)
    assert list(Path("/run/postgresql").glob("*.pid")) == []  # pg_ctlcluster's clusters (15-main.pid)
    assert not Path("/run/redis/redis-server.pid").exists()
    ours = set(postgres_server.pids()) | set(redis_server.pids())
    assert postgres_server.pid in ours and redis_server.pid in ours


def test_the_system_service_check_sees_a_daemonised_server(tmp_path: Path, redis_server: RedisInstance):
    """_system_daemons is not blind: a redis-server that daemonises itself (as the system service's does) is
    reported, while the fixtures' own instances are not."""
    port = daemon.free_port()
    pid_file = tmp_path / "redis.pid"
    subprocess.run(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                    "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--pidfile", str(pid_file),
                    "--logfile", str(tmp_path / "redis.log")], check=True, timeout=10, start_new_session=True)
    wait_until(pid_file.exists, seconds=10)
    pid = int(pid_file.read_text())
    try:
        assert (pid, "redis-server") in _system_daemons()
        assert all(p not in redis_server.pids() for p, _ in _system_daemons())
    finally:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _name_and_parent(pid) is None, seconds=5)


async def test_clients_from_several_tasks_at_once(postgres_server: PostgresInstance, redis_server: RedisInstance):
    """Several clients at once, as several site processes will be: each sees the others' writes."""
    async with await psycopg.AsyncConnection.connect(postgres_server.dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS many (n int PRIMARY KEY)")

    async def one(n: int) -> None:
        async with await psycopg.AsyncConnection.connect(postgres_server.dsn, autocommit=True) as conn:
            await conn.execute("INSERT INTO many VALUES (%s) ON CONFLICT DO NOTHING", (n,))
        client = redis.asyncio.Redis.from_url(redis_server.url_for(2), socket_timeout=5)
        await client.sadd("many", n)
        await client.aclose()

    await asyncio.gather(*(one(n) for n in range(8)))
    async with await psycopg.AsyncConnection.connect(postgres_server.dsn) as conn:
        cursor = await conn.execute("SELECT count(*) FROM many WHERE n < 8")
        assert await cursor.fetchone() == (8,)
    client = redis.asyncio.Redis.from_url(redis_server.url_for(2), socket_timeout=5)
    assert await client.scard("many") == 8
    await client.aclose()
