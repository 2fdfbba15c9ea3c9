"""Persistence: audits, checks and verifications in SQLite (WAL) or PostgreSQL, one schema version for both.

SQLite (the default, one machine): all database work runs on one dedicated thread, so async code never blocks the
event loop on disk I/O and the single connection is never shared between threads. PostgreSQL (several processes or
machines sharing the site, SECURE_DATABASE_URL=postgresql://...): the same queries run on a small pool of threads,
each with a connection of its own (app/store_sql.py holds what differs). Every write commits at once: a process
killed at any moment loses nothing it has stored (WAL survives a process crash; only power loss may drop the last
transaction).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.admission import Decision, Facts
from app.store_sql import (
    DEFAULT_POOL_SIZE,
    MIGRATION_LOCK,
    POSTGRES,
    SQLITE,
    Conn,
    DataVersionPoll,
    PgConn,
    PostgresListen,
    is_postgres,
    postgres_schema,
    row_factory,
)
from app.verdicts import CheckResult, Opening, TranscriptLine

SCHEMA_VERSION = 10
FIRST_POSTGRES_SCHEMA = 9  # PostgreSQL came with schema 9: the migrations before it are SQLite's own (json_each)
UNFINISHED = ("queued", "running")
T = TypeVar("T")

# The indexes the retention purge needs (schema 6): expired audits found by age, the FOREIGN KEY check on
# audits.previous_id (without it every deleted audit scans the whole table for re-tests pointing at it) and
# expired verifications. The children (checks, openings, audit_addresses) cascade through their primary keys,
# which begin with audit_id.
_PURGE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audits_created ON audits(created_at)",
    "CREATE INDEX IF NOT EXISTS audits_previous ON audits(previous_id)",
    "CREATE INDEX IF NOT EXISTS verifications_expires ON verifications(expires_at)",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audits (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    status TEXT NOT NULL,
    target TEXT NOT NULL,
    requester TEXT NOT NULL,
    verification_id TEXT,
    hosts TEXT NOT NULL,
    services TEXT NOT NULL,
    planned INTEGER NOT NULL DEFAULT 0,
    previous_id TEXT REFERENCES audits(id),
    engine_version TEXT NOT NULL,
    summary TEXT,
    error TEXT,
    target_key TEXT,
    requester_key TEXT,
    owner TEXT  -- the instance (process) that runs it: its row in `instances`; NULL on audits older than schema 8
);
CREATE INDEX IF NOT EXISTS audits_target ON audits(target_key, created_at);
CREATE INDEX IF NOT EXISTS audits_status ON audits(status);
CREATE INDEX IF NOT EXISTS audits_requester ON audits(requester_key, created_at);
-- the addresses an audit tests, one per server (budget key): the per-target cooldown and hourly budget
CREATE TABLE IF NOT EXISTS audit_addresses (
    audit_id TEXT NOT NULL REFERENCES audits(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (audit_id, address)
);
CREATE INDEX IF NOT EXISTS audit_addresses_by_address ON audit_addresses(address, created_at);
CREATE TABLE IF NOT EXISTS checks (
    audit_id TEXT NOT NULL REFERENCES audits(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    service TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    name TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    confirmed INTEGER NOT NULL,
    fingerprint TEXT,
    transcript TEXT NOT NULL,
    detail TEXT NOT NULL,
    tag TEXT,
    opening TEXT,  -- the key of the shared opening (in `openings`) that comes before `transcript`; NULL: none
    -- what the site shows of the check, made when it is stored (Derived): NULL on rows stored without it
    public TEXT,  -- the check's public JSON object, serialised
    public_key TEXT,  -- what `public` was made with (Derived.public_key); another key means it is stale
    guides TEXT,  -- JSON list of the matching guides' slugs, best first
    guides_key TEXT,  -- the guide library's digest `guides` was matched with
    data TEXT,  -- JSON object: the row's own public facts (a blocklist row's list and answer); NULL: none
    PRIMARY KEY (audit_id, seq)
);
CREATE INDEX IF NOT EXISTS checks_tag ON checks(tag) WHERE tag IS NOT NULL;
CREATE TABLE IF NOT EXISTS openings (  -- a relay session's connect, greeting and EHLO: stored once, shown per row
    audit_id TEXT NOT NULL REFERENCES audits(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    lines TEXT NOT NULL,
    PRIMARY KEY (audit_id, key)
);
CREATE TABLE IF NOT EXISTS verifications (
    id_hash TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    token TEXT NOT NULL,
    requester TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    verified_at REAL,
    method TEXT
);
-- one row per running instance of the site (schema 8): its heartbeat. An unfinished audit whose owner's last_seen is
-- older than SECURE_INSTANCE_STALE_SECONDS (or whose owner has no row) has lost its process: see interrupt_orphaned
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
-- what the listeners saw (schema 9), for the processes that wait for it: a sink arrival (kind 'sink', key: the
-- probe tag, source '') or a canary observation (kind 'canary', key: the check id, source: the address it came
-- from). Kept OBSERVATION_SECONDS at most, and at most MAX_OBSERVATIONS rows (record_observation trims)
CREATE TABLE IF NOT EXISTS observations (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    source TEXT NOT NULL,
    via TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (kind, key, source)
);
CREATE INDEX IF NOT EXISTS observations_at ON observations(at);
-- what a blocklist answered about an address (schema 10), shared by every process for
-- SECURE_BLOCKLIST_CACHE_SECONDS: `answer` is the probe's JSON (app/probes/blocklist.py); only real answers
CREATE TABLE IF NOT EXISTS blocklist_answers (
    address TEXT NOT NULL,
    list TEXT NOT NULL,
    answer TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (address, list)
);
CREATE INDEX IF NOT EXISTS blocklist_answers_at ON blocklist_answers(at);
""" + "".join(f"{statement};\n" for statement in _PURGE_INDEXES)


# Statements that bring a database of version N-1 to version N (a new database gets _SCHEMA directly). Those up to
# FIRST_POSTGRES_SCHEMA are SQLite's own; later ones run on both databases: write them in SQL both speak (`?`
# placeholders and REAL are translated for PostgreSQL, see app/store_sql.py).
_MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE checks ADD COLUMN tag TEXT"],
    3: ["ALTER TABLE audits ADD COLUMN target_key TEXT", "DROP INDEX IF EXISTS audits_target"],
    4: ["ALTER TABLE audits ADD COLUMN requester_key TEXT",
        "UPDATE audits SET requester_key=requester",
        "CREATE TABLE IF NOT EXISTS audit_addresses (audit_id TEXT NOT NULL REFERENCES audits(id) ON DELETE CASCADE,"
        " address TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (audit_id, address))",
        "INSERT OR IGNORE INTO audit_addresses(audit_id, address, created_at)"
        " SELECT audits.id, json_each.value, audits.created_at FROM audits, json_each(audits.hosts)"],
    # a check's shared opening, stored once in `openings` (created by _SCHEMA); older rows keep full transcripts
    5: ["ALTER TABLE checks ADD COLUMN opening TEXT"],
    # what the site shows of a check, made once when it is stored (older rows get it on their first read)
    6: ["ALTER TABLE checks ADD COLUMN public TEXT", "ALTER TABLE checks ADD COLUMN public_key TEXT",
        "ALTER TABLE checks ADD COLUMN guides TEXT", "ALTER TABLE checks ADD COLUMN guides_key TEXT"],
    # the retention purge's indexes on audits; verifications' comes with _SCHEMA (run next, IF NOT EXISTS), which
    # also creates that table in the oldest databases
    7: [statement for statement in _PURGE_INDEXES if " ON audits(" in statement],
    # who runs each audit; the `instances` table (their heartbeats) comes with _SCHEMA, run next
    8: ["ALTER TABLE audits ADD COLUMN owner TEXT"],
    # the listeners' observations, shared by processes: the `observations` table comes with _SCHEMA, run next
    9: [],
    # a row's own public facts (blocklist rows); the blocklist answers' cache comes with _SCHEMA, run next
    10: ["ALTER TABLE checks ADD COLUMN data TEXT"],
}
# An observation matters while an audit waits for it (SECURE_SINK_WAIT, an audit's deadline): an hour is plenty.
# A late arrival confirms its row at once (Auditor.delivered), without this table.
OBSERVATION_SECONDS = 3600.0
MAX_OBSERVATIONS = 20000
MAX_SOURCES = 20  # per canary check id, as the in-memory record keeps
ALL_ROWS = 2**62  # a LIMIT that bounds nothing (SQLite's LIMIT -1, PostgreSQL's LIMIT ALL)
TRIM_EVERY = 100  # the count bound is enforced every TRIM_EVERY records of a process (a cheap write otherwise)


class AuditTakenOver(Exception):
    """The audit is no longer this instance's: another worker took it over (this one was taken for dead)."""


def new_id() -> str:
    """A random, URL-safe id of 128 bits (22 characters)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Derived:
    """What the site shows of a check, made once when the check is stored or updated, not on every read (the web
    layer makes it: app/web/public.py). Each half carries the key it was made with, so that a reader can tell when
    it is stale (another guide library, another public address or engine) and make it again."""

    public: str  # the check's public JSON object (without `tag`), serialised
    public_key: str
    guides: tuple[str, ...]  # the matching guides' slugs, best first
    guides_key: str  # the guide library's digest


Deriver = Callable[[CheckResult], Derived]


@dataclass
class StoredCheck:
    seq: int
    finished_at: float
    result: CheckResult
    derived: Derived | None = None  # None: stored without it (before schema 6, or by a store without a deriver)


@dataclass
class Audit:
    id: str
    created_at: float
    status: str
    target: str
    requester: str
    hosts: list[str]
    services: list[str]
    planned: int
    engine_version: str
    previous_id: str | None = None
    verification_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    summary: dict[str, str | None] | None = None
    error: str | None = None
    target_key: str | None = None  # schema 3's "ip:<address>" / "domain:<name>", on old rows only (see audit_addresses)
    requester_key: str | None = None  # the requester's address, or its IPv6 /64: what per-requester limits count
    owner: str | None = None  # the instance that runs it (Auditor.instance_id); None on audits before schema 8
    checks: list[StoredCheck] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


def _audit_from_row(row: Any) -> Audit:
    return Audit(
        id=row["id"], created_at=row["created_at"], status=row["status"], target=row["target"],
        requester=row["requester"], hosts=json.loads(row["hosts"]), services=json.loads(row["services"]),
        planned=row["planned"], engine_version=row["engine_version"], previous_id=row["previous_id"],
        verification_id=row["verification_id"], started_at=row["started_at"], finished_at=row["finished_at"],
        summary=json.loads(row["summary"]) if row["summary"] else None, error=row["error"],
        target_key=row["target_key"], requester_key=row["requester_key"], owner=row["owner"],
    )


def _addresses_of(c: Conn, audit_id: str) -> list[str]:
    return [r[0] for r in c.execute("SELECT address FROM audit_addresses WHERE audit_id=? ORDER BY rowid",
                                    (audit_id,))]


def _latest_covering(c: Conn, addresses: Sequence[str], since: float) -> Audit | None:
    """The newest audit of any of the addresses since `since` that may be served again: never a failed or
    interrupted one (an error is not a result)."""
    if not addresses:
        return None
    marks = ",".join("?" * len(addresses))
    row = c.execute(
        f"SELECT audits.* FROM audits JOIN audit_addresses a ON a.audit_id = audits.id WHERE a.address IN ({marks})"
        " AND a.created_at >= ? AND audits.status IN ('queued','running','done') ORDER BY audits.created_at DESC"
        " LIMIT 1", (*addresses, since)).fetchone()
    return _audit_from_row(row) if row else None


def _lines_json(lines: Iterable[TranscriptLine]) -> str:
    return json.dumps([line.to_dict() for line in lines])


def _lines(text: str) -> list[TranscriptLine]:
    return [TranscriptLine(**line) for line in json.loads(text)]


def _check_from_row(row: Any, openings: dict[str, Opening]) -> StoredCheck:
    """A row's transcript is its shared opening (one object per audit, see _openings) followed by its own lines;
    rows stored before version 5, and rows without an opening, hold every line themselves."""
    own = _lines(row["transcript"])
    opening = openings.get(row["opening"]) if row["opening"] else None
    result = CheckResult(
        service=row["service"], host=row["host"], port=row["port"], name=row["name"], verdict=row["verdict"],
        reason=row["reason"], confirmed=bool(row["confirmed"]),
        fingerprint=json.loads(row["fingerprint"]) if row["fingerprint"] else None,
        transcript=[*opening.lines, *own] if opening is not None else own, detail=row["detail"],
        tag=row["tag"], opening=opening, data=json.loads(row["data"]) if row["data"] else None,
    )
    return StoredCheck(seq=row["seq"], finished_at=row["finished_at"], result=result, derived=_derived(row))


def _derived(row: Any) -> Derived | None:
    if row["public_key"] is None:
        return None
    return Derived(public=row["public"], public_key=row["public_key"], guides=tuple(json.loads(row["guides"])),
                   guides_key=row["guides_key"])


def _derived_values(derived: Derived | None) -> tuple[str | None, str | None, str | None, str | None]:
    if derived is None:
        return None, None, None, None
    return derived.public, derived.public_key, json.dumps(list(derived.guides)), derived.guides_key


def _openings(c: Conn, audit_id: str, key: str | None = None) -> dict[str, Opening]:
    """The shared openings of an audit (or the one with `key`), each read once."""
    if key is None:
        rows = c.execute("SELECT key, lines FROM openings WHERE audit_id=?", (audit_id,))
    else:
        rows = c.execute("SELECT key, lines FROM openings WHERE audit_id=? AND key=?", (audit_id, key))
    return {row["key"]: Opening(row["key"], _lines(row["lines"])) for row in rows}


def _found_version(c: Conn) -> int | None:
    row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row["value"]) if row else None


def _migrate(c: Conn, found: int | None, script: Callable[[str], object],
             ddl: Callable[[str], str] = str) -> None:
    """Bring a database of version `found` (None: a new one) to SCHEMA_VERSION, in the caller's transaction.
    `ddl`: the database's own column types (postgres_schema on PostgreSQL), for the migrations and the schema."""
    if found is not None and found > SCHEMA_VERSION:
        raise RuntimeError(f"database schema {found} is newer than this code ({SCHEMA_VERSION})")
    for version in range(found or SCHEMA_VERSION, SCHEMA_VERSION):
        for statement in _MIGRATIONS[version + 1]:
            c.execute(ddl(statement))
    script(ddl(_SCHEMA))
    c.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
              " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))


class Store:
    def __init__(self, location: str, derive: Deriver | None = None, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        """`location`: a SQLite file's path (or ":memory:"), or a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:
        PORT/DATABASE, also postgres://): then a pool of `pool_size` connections, each on its own thread.
        `derive`: what the site shows of a check (Derived), made by add_check and update_check as they store it."""
        self.path = location
        self.derive = derive
        self.dialect = POSTGRES if is_postgres(location) else SQLITE
        workers = max(1, pool_size) if self.dialect is POSTGRES else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")
        self._conn: sqlite3.Connection | None = None
        self._pool: Any = None  # PostgreSQL: psycopg_pool.ConnectionPool
        self._pool_size = workers
        self._checkpointer: _Checkpointer | None = None  # the retention purge's, made on first use
        self._observations = 0  # recorded by this Store: every TRIM_EVERY-th trims the table to MAX_OBSERVATIONS
        # live progress across processes (watch): what this process's followers wait for, and who tells them
        self.origin = new_id()
        self.on_change: Callable[[str], None] | None = None
        self._watched: Counter[str] = Counter()
        self._feed: DataVersionPoll | PostgresListen | None = None

    @property
    def postgres(self) -> bool:
        return self.dialect is POSTGRES

    # --- plumbing -------------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[Conn], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[Conn], T]) -> T:
        if self._pool is not None:
            with self._pool.connection() as raw:  # one transaction per call, committed before we return
                try:
                    result = fn(PgConn(raw))
                    raw.commit()
                except BaseException:
                    raw.rollback()
                    raise
                return result
        if self._conn is None:
            raise RuntimeError("store is not open")
        with self._conn:  # one transaction per call, committed before we return
            return fn(self._conn)

    def _open(self) -> None:
        if self.postgres:
            self._open_postgres()
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        with conn:
            found = None
            if conn.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone():
                found = _found_version(conn)
            _migrate(conn, found, conn.executescript)
        self._conn = conn

    def _open_postgres(self) -> None:
        """The pool, and the schema: made or migrated by one process at a time (an advisory lock held until the
        migration commits), so that processes starting together never race to create the same table."""
        from psycopg_pool import ConnectionPool

        def configure(raw: Any) -> None:
            raw.row_factory = row_factory

        # check: a pooled session that died under us (a database restart, a failover, a proxy's idle timeout) is
        # found by a round-trip when handed out and replaced, instead of failing the call that got it
        pool = ConnectionPool(self.path, min_size=self._pool_size, max_size=self._pool_size, open=False,
                              configure=configure, check=ConnectionPool.check_connection, timeout=30, name="store")
        try:
            pool.open(wait=True, timeout=30)
            with pool.connection() as raw:
                conn = PgConn(raw)
                conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                found = None
                if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
                    found = _found_version(conn)
                if found is not None and found < FIRST_POSTGRES_SCHEMA:
                    raise RuntimeError(f"database schema {found} predates PostgreSQL support")
                _migrate(conn, found, raw.execute, postgres_schema)
                raw.commit()
        except BaseException:
            pool.close()
            raise
        self._pool = pool

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.close()

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)
        if self._checkpointer is not None:
            await self._checkpointer.close()

    def _notify(self, c: Conn, audit_id: str) -> None:
        """Tell the other processes (on commit) that the audit changed: PostgreSQL's NOTIFY; SQLite needs nothing
        (they poll its data_version)."""
        if self.dialect.notify is not None:
            c.execute(self.dialect.notify, (f"{audit_id} {self.origin}",))

    # --- live progress across processes ---------------------------------------------------------------------
    async def watch(self, audit_id: str) -> None:
        """From now on, a change another process makes to the audit calls on_change(audit_id) (PostgreSQL: within
        milliseconds of its commit; SQLite: within POLL_EVERY s). Pair each watch with an unwatch."""
        self._watched[audit_id] += 1
        if self._feed is None:
            if self.postgres:
                self._feed = PostgresListen(self.path, self.origin, self._watched.keys, self._changed)
            else:
                self._feed = DataVersionPoll(self._data_version, self._watched.keys, self._changed)
        await self._feed.start()

    def unwatch(self, audit_id: str) -> None:
        self._watched[audit_id] -= 1
        if self._watched[audit_id] <= 0:
            del self._watched[audit_id]

    def _changed(self, audit_id: str) -> None:
        if audit_id in self._watched and self.on_change is not None:
            self.on_change(audit_id)

    async def _data_version(self) -> int:
        return await self._run(lambda c: int(c.execute("PRAGMA data_version").fetchone()[0]))

    # --- meta -----------------------------------------------------------------------------------------------
    async def schema_version(self) -> int:
        return await self._run(
            lambda c: int(c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()["value"]))

    async def secret(self) -> str:
        """The server secret, made once and kept, for HMACs (CSRF tokens, canary tokens)."""
        def _secret(c: Conn) -> str:
            row = c.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
            if row:
                return str(row["value"])
            value = secrets.token_urlsafe(32)
            c.execute("INSERT INTO meta(key, value) VALUES ('secret', ?)", (value,))
            return value
        return await self._run(_secret)

    # --- audits ---------------------------------------------------------------------------------------------
    async def create_audit(self, audit: Audit, addresses: Sequence[str] = ()) -> None:
        """Store an audit without any limit (tests and tools); the site admits audits through admit()."""
        await self._run(lambda c: self._insert_audit(c, audit, addresses))

    @staticmethod
    def _insert_audit(c: Conn, audit: Audit, addresses: Sequence[str]) -> None:
        c.execute(
            "INSERT INTO audits(id, created_at, status, target, requester, verification_id, hosts, services,"
            " planned, previous_id, engine_version, target_key, requester_key, owner)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (audit.id, audit.created_at, audit.status, audit.target, audit.requester, audit.verification_id,
             json.dumps(audit.hosts), json.dumps(audit.services), audit.planned, audit.previous_id,
             audit.engine_version, audit.target_key, audit.requester_key or audit.requester, audit.owner))
        c.executemany("INSERT INTO audit_addresses(audit_id, address, created_at) VALUES (?,?,?)"
                      " ON CONFLICT DO NOTHING",
                      [(audit.id, address, audit.created_at) for address in addresses])

    async def admit(self, audit: Audit, addresses: Sequence[str], cooldown: float,
                    decide: Callable[[Facts], Decision]) -> Decision:
        """Read every fact a limit needs and create the audit if `decide` allows it, in one write transaction that
        no other admission overlaps, also across processes sharing the database (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: a site-wide advisory lock held until commit, see store_sql.POSTGRES), so concurrent requests
        are counted one after the other. `addresses` are the audit's budget keys."""
        key = audit.requester_key or audit.requester

        def _admit(c: Conn) -> Decision:
            c.execute(self.dialect.admission_lock)
            now = time.time()
            marks = ",".join("?" * len(addresses))
            latest = _latest_covering(c, addresses, now - cooldown) if cooldown > 0 else None
            target_hour = [(r["address"], r["n"], r["oldest"]) for r in c.execute(
                f"SELECT address, COUNT(*) AS n, MIN(created_at) AS oldest FROM audit_addresses"
                f" WHERE address IN ({marks}) AND created_at >= ? GROUP BY address ORDER BY n DESC",
                (*addresses, now - 3600))] if addresses else []
            running = c.execute("SELECT COUNT(*) FROM audits WHERE requester_key=? AND status IN"
                                " ('queued','running')", (key,)).fetchone()[0]
            hour = c.execute("SELECT COUNT(*), MIN(created_at) FROM audits WHERE requester_key=? AND"
                             " created_at >= ?", (key, now - 3600)).fetchone()
            queued = c.execute("SELECT COUNT(*) FROM audits WHERE status='queued'").fetchone()[0]
            decision = decide(Facts(now=now, latest=latest, target_hour=target_hour, requester_running=running,
                                    requester_hour=hour[0], requester_oldest=hour[1], queued=queued))
            if decision.outcome == "create":
                audit.created_at = now
                self._insert_audit(c, audit, addresses)
            return decision
        return await self._run(_admit)

    async def latest_covering(self, audit_id: str, since: float) -> Audit | None:
        """The newest servable audit since `since` of any address that audit `audit_id` tested (the cooldown's
        subject): the audit itself, or a later one."""
        def _latest(c: Conn) -> Audit | None:
            return _latest_covering(c, _addresses_of(c, audit_id), since)
        return await self._run(_latest)

    async def addresses_of(self, audit_id: str) -> list[str]:
        return await self._run(lambda c: _addresses_of(c, audit_id))

    async def _write(self, audit_id: str, sql: str, parameters: Sequence[Any]) -> None:
        """One statement changing an audit, and the other processes told of it (_notify), in one transaction."""
        def _execute(c: Conn) -> None:
            c.execute(sql, parameters)
            self._notify(c, audit_id)
        await self._run(_execute)

    async def claim(self, audit_id: str, owner: str) -> bool:
        """A worker takes an audit of the job queue (new, or one a dead worker left): it becomes `running` and
        `owner`'s; False when the audit is no longer unfinished (nothing to run)."""
        def _claim(c: Conn) -> bool:
            row = c.execute("UPDATE audits SET status='running', owner=?, started_at=COALESCE(started_at, ?)"
                            " WHERE id=? AND status IN ('queued', 'running') RETURNING id",
                            (owner, time.time(), audit_id)).fetchone()
            self._notify(c, audit_id)
            return row is not None
        return await self._run(_claim)

    async def mark_running(self, audit_id: str) -> None:
        await self._write(audit_id, "UPDATE audits SET status='running', started_at=? WHERE id=? AND status='queued'",
                          (time.time(), audit_id))

    async def finish_audit(self, audit_id: str, status: str, summary: dict[str, str | None] | None,
                           error: str | None = None, owner: str | None = None) -> None:
        """`owner`: only if the audit is still that instance's (a worker taken for dead whose audit another worker
        took over must not end it)."""
        fence, fenced = (" AND owner=?", (owner,)) if owner is not None else ("", ())
        await self._write(audit_id, "UPDATE audits SET status=?, summary=?, error=?, finished_at=? WHERE id=?" + fence,
                          (status, json.dumps(summary) if summary is not None else None, error, time.time(),
                           audit_id, *fenced))

    async def set_summary(self, audit_id: str, summary: dict[str, str | None]) -> None:
        """A finished audit's summary after a later finding changed one of its checks (a late delivery)."""
        await self._write(audit_id, "UPDATE audits SET summary=? WHERE id=? AND status='done'",
                          (json.dumps(summary), audit_id))

    def derived(self, result: CheckResult) -> Derived | None:
        """What the site shows of `result` (None without a deriver): made once, stored with the row."""
        return self.derive(result) if self.derive is not None else None

    async def add_check(self, audit_id: str, seq: int, result: CheckResult, derived: Derived | None = None,
                        owner: str | None = None) -> float:
        """The row with its own lines; its shared opening goes to `openings` with the first row that uses it.
        `derived`: what the site shows of it, if the caller made it already (otherwise made here). `owner`: only
        while the audit is still that instance's, else AuditTakenOver (a worker taken for dead whose audit another
        worker resumed must not write rows beside the new ones: their seq would collide)."""
        finished_at = time.time()
        fingerprint = json.dumps(result.fingerprint) if result.fingerprint is not None else None
        data = json.dumps(result.data) if result.data is not None else None
        own = _lines_json(result.own_lines)
        opening = result.opening
        shown = _derived_values(derived or self.derived(result))

        def _insert(c: Conn) -> None:
            if owner is not None and not c.execute("SELECT 1 FROM audits WHERE id=? AND owner=?",
                                                   (audit_id, owner)).fetchone():
                raise AuditTakenOver(audit_id)
            if opening is not None and not c.execute("SELECT 1 FROM openings WHERE audit_id=? AND key=?",
                                                     (audit_id, opening.key)).fetchone():
                c.execute("INSERT INTO openings(audit_id, key, lines) VALUES (?,?,?)",
                          (audit_id, opening.key, _lines_json(opening.lines)))
            c.execute(
                "INSERT INTO checks(audit_id, seq, finished_at, service, host, port, name, verdict, reason,"
                " confirmed, fingerprint, transcript, detail, tag, opening, public, public_key, guides, guides_key,"
                " data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (audit_id, seq, finished_at, result.service, result.host, result.port, result.name,
                 result.verdict.value, result.reason, int(result.confirmed), fingerprint, own, result.detail,
                 result.tag, opening.key if opening is not None else None, *shown, data))
            self._notify(c, audit_id)
        await self._run(_insert)
        return finished_at

    async def update_check(self, audit_id: str, seq: int, result: CheckResult, derived: Derived | None = None) -> None:
        """A later finding about a stored check (our sink received its message); its opening stays as stored.
        What the site shows of it is made again (`derived`, or here), or cleared when there is no deriver."""
        own = _lines_json(result.own_lines)
        shown = _derived_values(derived or self.derived(result))
        await self._write(audit_id,
                          "UPDATE checks SET verdict=?, reason=?, confirmed=?, transcript=?, detail=?, public=?,"
                          " public_key=?, guides=?, guides_key=? WHERE audit_id=? AND seq=?",
                          (result.verdict.value, result.reason, int(result.confirmed), own, result.detail, *shown,
                           audit_id, seq))

    async def set_derived(self, audit_id: str, rows: Sequence[tuple[int, Derived]]) -> None:
        """What the site shows of rows that were read without it, or stale: made again by a reader. A row that
        meanwhile got it with the same keys (update_check) keeps its own, which is newer."""
        await self._run(lambda c: c.executemany(
            "UPDATE checks SET public=?, public_key=?, guides=?, guides_key=? WHERE audit_id=? AND seq=?"
            " AND (public_key IS DISTINCT FROM ? OR guides_key IS DISTINCT FROM ?)",
            [(*_derived_values(d), audit_id, seq, d.public_key, d.guides_key) for seq, d in rows]))

    async def find_check_by_tag(self, tag: str) -> tuple[str, StoredCheck] | None:
        def _find(c: Conn) -> tuple[str, StoredCheck] | None:
            row = c.execute("SELECT * FROM checks WHERE tag=?", (tag,)).fetchone()
            if row is None:
                return None
            openings = _openings(c, row["audit_id"], row["opening"]) if row["opening"] else {}
            return row["audit_id"], _check_from_row(row, openings)
        return await self._run(_find)

    async def get_audit(self, audit_id: str, with_checks: bool = True, transcripts: bool = True) -> Audit | None:
        """The audit; with its checks unless `with_checks` is false, and their transcripts unless `transcripts` is
        false (comparing verdicts with a previous audit needs no evidence). An opening shared by several rows is
        read once and its lines are the same objects in each of them.

        Read in this order (the audit, its checks, their openings): on PostgreSQL each statement sees what was
        committed when it began, so a finished audit comes with all its checks, and each check with its opening
        (stored in the same transaction as the first check that uses it)."""
        def _get(c: Conn) -> Audit | None:
            row = c.execute("SELECT * FROM audits WHERE id=?", (audit_id,)).fetchone()
            if row is None:
                return None
            audit = _audit_from_row(row)
            if with_checks:
                if transcripts:
                    query = "SELECT * FROM checks WHERE audit_id=? ORDER BY seq"
                else:
                    query = ("SELECT seq, finished_at, service, host, port, name, verdict, reason, confirmed,"
                             " fingerprint, '[]' AS transcript, detail, tag, NULL AS opening, NULL AS public,"
                             " NULL AS public_key, NULL AS guides, NULL AS guides_key, data FROM checks"
                             " WHERE audit_id=? ORDER BY seq")
                rows = c.execute(query, (audit_id,)).fetchall()
                openings = _openings(c, audit_id) if any(r["opening"] for r in rows) else {}
                audit.checks = [_check_from_row(r, openings) for r in rows]
            return audit
        return await self._run(_get)

    async def get_audit_shown(self, audit_id: str, public_key: str) -> Audit | None:
        """The audit with its checks as the API shows them: a row whose public JSON was made with `public_key`
        comes with it and without its transcript (the JSON holds it); any other row comes whole, so that the
        reader can make it again (and store it: set_derived)."""
        def _get(c: Conn) -> Audit | None:
            row = c.execute("SELECT * FROM audits WHERE id=?", (audit_id,)).fetchone()
            if row is None:
                return None
            audit = _audit_from_row(row)
            rows = c.execute(
                "SELECT seq, finished_at, service, host, port, name, verdict, reason, confirmed, fingerprint,"
                " CASE WHEN public_key IS NOT DISTINCT FROM ? THEN '[]' ELSE transcript END AS transcript, detail, tag,"
                " CASE WHEN public_key IS NOT DISTINCT FROM ? THEN NULL ELSE opening END AS opening, public,"
                " public_key, guides, guides_key, data FROM checks WHERE audit_id=? ORDER BY seq",
                (public_key, public_key, audit_id)).fetchall()
            openings = _openings(c, audit_id) if any(r["opening"] for r in rows) else {}
            audit.checks = [_check_from_row(r, openings) for r in rows]
            return audit
        return await self._run(_get)

    async def retest_chain(self, audit_id: str, limit: int = 50) -> list[Audit]:
        """The audit and its predecessors, newest first (bounded)."""
        chain: list[Audit] = []
        current: str | None = audit_id
        while current and len(chain) < limit:
            audit = await self.get_audit(current, with_checks=False)
            if audit is None:
                break
            chain.append(audit)
            current = audit.previous_id
        return chain

    # --- instances: who runs which audit (several processes may share the database) -------------------------
    async def beat(self, instance_id: str) -> None:
        """The instance is alive: its row's last_seen is now (the row is made on the first beat, and again if
        another instance took it for gone and removed it)."""
        now = time.time()
        await self._run(lambda c: c.execute(
            "INSERT INTO instances(id, started_at, last_seen) VALUES (?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET last_seen=excluded.last_seen", (instance_id, now, now)))

    async def interrupt_orphaned(self, stale: float, spared: str = "") -> int:
        """Audits whose process is gone can never finish now: the unfinished audits whose owner has not beaten for
        `stale` seconds (or has no row, or which have no owner: made before schema 8) become `interrupted`, and the
        rows of those gone instances are removed. An audit of a live instance is never touched. `spared`: an SQL
        condition on `audits` (no parameters) under which an orphan is not interrupted either: the job queue's,
        whose job for it can still run (app/jobs.py)."""
        spare = f" AND NOT ({spared})" if spared else ""

        def _interrupt(c: Conn) -> int:
            now = time.time()
            ids = c.execute(
                "UPDATE audits SET status='interrupted', finished_at=?, error='the site restarted during this audit'"
                " WHERE status IN ('queued', 'running') AND (owner IS NULL OR owner NOT IN"
                " (SELECT id FROM instances WHERE last_seen >= ?))" + spare + " RETURNING id",
                (now, now - stale)).fetchall()
            c.execute("DELETE FROM instances WHERE last_seen < ?", (now - stale,))
            for row in ids:
                self._notify(c, row[0])
            return len(ids)
        return await self._run(_interrupt)

    async def leave(self, instance_id: str, interrupt: bool = True) -> int:
        """A clean stop: the instance's own unfinished audits become `interrupted` (no one else's; none when not
        `interrupt`: the job queue holds them, other workers run them), and its row goes."""
        def _leave(c: Conn) -> int:
            if not interrupt:
                c.execute("DELETE FROM instances WHERE id=?", (instance_id,))
                return 0
            ids = c.execute(
                "UPDATE audits SET status='interrupted', finished_at=?, error='the site shut down'"
                " WHERE status IN ('queued', 'running') AND owner=? RETURNING id",
                (time.time(), instance_id)).fetchall()
            c.execute("DELETE FROM instances WHERE id=?", (instance_id,))
            for row in ids:
                self._notify(c, row[0])
            return len(ids)
        return await self._run(_leave)

    # --- observations: what the listeners saw, for every process ------------------------------------------------
    async def record_observation(self, kind: str, key: str, source: str = "", via: str = "") -> None:
        """A sink arrival or a canary observation; rows older than OBSERVATION_SECONDS go in the same transaction,
        and, every TRIM_EVERY records, the oldest beyond MAX_OBSERVATIONS. At most MAX_SOURCES sources per key."""
        self._observations += 1
        trim = self._observations % TRIM_EVERY == 1 % TRIM_EVERY

        def _record(c: Conn) -> None:
            now = time.time()
            count = c.execute("SELECT COUNT(*) FROM observations WHERE kind=? AND key=?", (kind, key)).fetchone()[0]
            if count < MAX_SOURCES:
                c.execute("INSERT INTO observations(kind, key, source, via, at) VALUES (?,?,?,?,?)"
                          " ON CONFLICT DO NOTHING",
                          (kind, key, source, via, now))
            c.execute("DELETE FROM observations WHERE at < ?", (now - OBSERVATION_SECONDS,))
            if trim:
                c.execute("DELETE FROM observations WHERE rowid IN (SELECT rowid FROM observations"
                          " ORDER BY at DESC, rowid DESC LIMIT ? OFFSET ?)", (ALL_ROWS, MAX_OBSERVATIONS))
        await self._run(_record)

    async def observed(self, kind: str, keys: Iterable[str]) -> dict[str, list[str]]:
        """The keys among `keys` seen by a listener, each with its sources (sorted)."""
        wanted = sorted(set(keys))[:1000]

        def _observed(c: Conn) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            marks = ",".join("?" * len(wanted))
            for row in c.execute(f"SELECT key, source FROM observations WHERE kind=? AND key IN ({marks})"
                                 " ORDER BY key, source", (kind, *wanted)):
                found.setdefault(row["key"], []).append(row["source"])
            return found
        return await self._run(_observed) if wanted else {}

    # --- blocklist answers: a cache shared by every process (app/probes/blocklist.py) --------------------------
    async def blocklist_answers(self, address: str, since: float) -> dict[str, tuple[str, float]]:
        """The answers about `address` stored at `since` or later: list id -> (answer JSON, when)."""
        def _get(c: Conn) -> dict[str, tuple[str, float]]:
            rows = c.execute("SELECT list, answer, at FROM blocklist_answers WHERE address=? AND at>=?",
                             (address, since))
            return {row["list"]: (row["answer"], row["at"]) for row in rows}
        return await self._run(_get)

    async def remember_blocklist_answers(self, address: str, answers: Sequence[tuple[str, str]],
                                         keep: float) -> None:
        """Store the lists' answers about `address` (list id, answer JSON); answers older than `keep` seconds go in
        the same transaction, so the table holds at most what the cache may serve."""
        def _put(c: Conn) -> None:
            now = time.time()
            c.executemany("INSERT INTO blocklist_answers(address, list, answer, at) VALUES (?,?,?,?)"
                          " ON CONFLICT(address, list) DO UPDATE SET answer=excluded.answer, at=excluded.at",
                          [(address, list_id, answer, now) for list_id, answer in answers])
            c.execute("DELETE FROM blocklist_answers WHERE at < ?", (now - keep,))
        if answers:
            await self._run(_put)

    # --- verifications --------------------------------------------------------------------------------------
    async def create_verification(self, id_hash: str, domain: str, token: str, requester: str,
                                  expires_at: float) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO verifications(id_hash, domain, token, requester, created_at, expires_at) VALUES"
            " (?,?,?,?,?,?)", (id_hash, domain, token, requester, time.time(), expires_at)))

    async def get_verification(self, id_hash: str) -> dict[str, object] | None:
        def _get(c: Conn) -> dict[str, object] | None:
            row = c.execute("SELECT * FROM verifications WHERE id_hash=?", (id_hash,)).fetchone()
            return dict(row) if row else None
        return await self._run(_get)

    async def mark_verified(self, id_hash: str, method: str) -> None:
        await self._run(lambda c: c.execute(
            "UPDATE verifications SET verified_at=?, method=? WHERE id_hash=? AND verified_at IS NULL",
            (time.time(), method, id_hash)))

    # --- retention (app/retention.py runs the batches) -------------------------------------------------------
    async def purge_batch(self, cutoff: float, limit: int, budget: float) -> PurgeBatch:
        """One short transaction of the retention purge: see _purge_batch."""
        return await self._run(lambda c: _purge_batch(c, cutoff, limit, budget))

    async def checkpoint(self) -> float:
        """Copy the WAL's committed pages into the database file now; the seconds it took. After each purge batch,
        so that no later commit meets a WAL of thousands of pages and checkpoints them all at once (SQLite's
        automatic checkpoint, at 1000 pages, inside that commit). It runs on a connection and thread of its own:
        its writes and fsyncs never hold the store's thread, which goes on serving meanwhile. Nothing to do on
        PostgreSQL (its own checkpointer and autovacuum take care of it)."""
        if self.path == ":memory:" or self.postgres:
            return 0.0
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self.path)
        return await self._checkpointer.run()


class _Checkpointer:
    """A second connection that only ever checkpoints (PASSIVE: it never waits for the store's reads or writes,
    and they never wait for it), on its own thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-checkpoint")
        self._conn: sqlite3.Connection | None = None

    def _checkpoint(self) -> float:
        start = time.perf_counter()
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=30)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return time.perf_counter() - start

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def run(self) -> float:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._checkpoint)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)


# --- retention: one batch of the purge ----------------------------------------------------------------------
_EXPIRED = "created_at < ? AND status NOT IN ('queued','running')"


@dataclass
class PurgeBatch:
    audits: int  # audits deleted (their checks, openings and addresses cascade)
    verifications: int  # verifications deleted
    worked: float  # seconds spent deleting, before the commit
    held: float  # seconds the store's thread spent on this batch, commit included
    done: bool  # nothing expired is left


def _purge_batch(c: Conn, cutoff: float, limit: int, budget: float) -> PurgeBatch:
    """Delete up to `limit` expired audits, a quarter of them per statement, stopping early once `budget` seconds
    of deleting have gone (after one statement at least), then commit. Expired verifications (small rows) go
    first, up to `limit * 16`."""
    start = time.perf_counter()
    limit = max(1, limit)
    chunk, step = max(1, limit // 4), limit * 16
    verifications = c.execute("DELETE FROM verifications WHERE rowid IN (SELECT rowid FROM verifications"
                              " WHERE expires_at < ? LIMIT ?)", (cutoff, step)).rowcount
    audits, exhausted = 0, False
    while audits < limit and not exhausted and (audits == 0 or time.perf_counter() - start < budget):
        ids = [row[0] for row in c.execute(f"SELECT id FROM audits WHERE {_EXPIRED} LIMIT ?",
                                           (cutoff, min(chunk, limit - audits)))]
        exhausted = len(ids) < min(chunk, limit - audits)
        if ids:
            marks = ",".join("?" * len(ids))
            # a re-test keeps a link to its predecessor; drop the link before the predecessor goes
            c.execute(f"UPDATE audits SET previous_id=NULL WHERE previous_id IN ({marks})", ids)
            audits += c.execute(f"DELETE FROM audits WHERE id IN ({marks})", ids).rowcount
    worked = time.perf_counter() - start
    c.commit()  # writes the changed (and, with secure_delete, the zeroed freed) pages to the WAL
    return PurgeBatch(audits=audits, verifications=verifications, worked=worked, held=time.perf_counter() - start,
                      done=exhausted and verifications < step)
