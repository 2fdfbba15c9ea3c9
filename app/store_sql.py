"""What differs between the store's two databases, kept small so that every query is written once (app/store.py).

SQLite (the default, one machine): one connection on one thread, `?` placeholders, `rowid`. PostgreSQL (several
machines, SECURE_DATABASE_URL=postgresql://...): a pool of psycopg connections, each used by one thread at a time;
the same SQL with its `?` turned into psycopg's `%s`, rows readable by name and by position as sqlite3.Row are,
DOUBLE PRECISION where SQLite says REAL (PostgreSQL's REAL is 4 bytes: a timestamp would lose its seconds), `ctid`
where SQLite says `rowid`. psycopg (the `postgres` extra) is imported only where PostgreSQL is used.

Both speak the upsert (`ON CONFLICT ... DO NOTHING / DO UPDATE`), `IS [NOT] DISTINCT FROM` and `RETURNING`, so the
queries use those forms rather than SQLite's own `INSERT OR IGNORE` and `IS ?`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from app.config import POSTGRES_SCHEMES
from app.logs import get_logger

log = get_logger("store")

DEFAULT_POOL_SIZE = 5
# advisory lock keys (pg_advisory_xact_lock takes a bigint): any fixed numbers of our own
ADMISSION_LOCK = 0x5359_5301  # admit(): one admission at a time, site-wide, as SQLite's BEGIN IMMEDIATE does
MIGRATION_LOCK = 0x5359_5302  # open(): one process migrates, the others wait and find the schema current
CHANNEL = "audit_changes"  # NOTIFY payload: "<audit id> <origin>", origin: the Store that wrote it


class Rows(Protocol):
    """A cursor, as both drivers return from execute()."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """The part of a DB-API connection the store's queries use (sqlite3.Connection, or PgConn)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Rows: ...

    def commit(self) -> None: ...


@dataclass(frozen=True)
class Dialect:
    name: str
    admission_lock: str  # admit()'s first statement: from then on no other admission runs until this one commits
    notify: str | None  # tells the other processes that an audit changed, on commit (`?`: the payload); None: none


SQLITE = Dialect(name="sqlite", admission_lock="BEGIN IMMEDIATE", notify=None)
# One lock for every admission (not one per budget key or requester): the site-wide queue bound counts every
# queued audit, so two admissions of different requesters and targets may still decide the same limit. Admitting
# is one short transaction (a few indexed counts and an insert): taking turns costs little, and it is exact.
POSTGRES = Dialect(name="postgresql", admission_lock=f"SELECT pg_advisory_xact_lock({ADMISSION_LOCK})",
                   notify=f"SELECT pg_notify('{CHANNEL}', ?)")


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)


def redacted(location: str) -> str:
    """A database location fit for a log: a URL's password is replaced by ***."""
    if not is_postgres(location):
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_ROWID = re.compile(r"\browid\b")


@lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """The store's SQL for psycopg: `?` -> `%s` (a literal `%` doubled), SQLite's `rowid` -> `ctid` (a row's
    physical id: bounded deletes, `WHERE rowid IN (SELECT rowid ... LIMIT n)`, and insertion order). Our queries
    hold neither `?` nor `rowid` inside a literal."""
    return _ROWID.sub("ctid", sql.replace("%", "%%").replace("?", "%s"))



def postgres_schema(schema: str) -> str:
    """The SQLite schema for PostgreSQL: REAL columns become DOUBLE PRECISION (8 bytes, as SQLite's REAL)."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", schema)


class Row:
    """A PostgreSQL row readable as a sqlite3.Row: row["name"], row[0], dict(row)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)


def row_factory(cursor: Any) -> Any:
    """psycopg's row factory making Row objects."""
    index = {column.name: n for n, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        return Row(values, index)
    return make


class PgConn:
    """A psycopg connection seen through the Conn protocol: the store's `?` SQL, executemany on a cursor."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Rows:
        cursor: Rows = self.raw.execute(postgres_sql(sql), parameters)
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Rows:
        cursor = self.raw.cursor()
        cursor.executemany(postgres_sql(sql), list(parameters))
        rows: Rows = cursor
        return rows

    def commit(self) -> None:
        self.raw.commit()


# --- changes made by other processes: live progress across instances --------------------------------------------
POLL_EVERY = 0.25  # seconds between two looks at SQLite's data_version, while this process follows another's audit
LISTEN_READY = 5.0  # seconds watch() waits for the LISTEN connection (then followers fall back to their keep-alive)
LISTEN_RETRY = 1.0  # seconds before a lost LISTEN connection is made again


class DataVersionPoll:
    """SQLite: `PRAGMA data_version` changes when another connection (another process) commits to the file. Polled
    every POLL_EVERY s while some audit is watched, it wakes every watched audit's followers (it cannot tell which
    audit changed: they re-read the store, which is cheap, and send only what is new)."""

    def __init__(self, version: Callable[[], Awaitable[int]], watched: Callable[[], Collection[str]],
                 changed: Callable[[str], None], every: float = POLL_EVERY) -> None:
        self._version, self._watched, self._changed, self.every = version, watched, changed, every
        self._task: asyncio.Task[None] | None = None
        self._last = 0

    async def start(self) -> None:
        """Polling from now on (a change committed after this returns is seen), until nothing is watched."""
        if self._task is not None and not self._task.done():
            return
        self._last = await self._version()
        self._task = asyncio.create_task(self._poll(), name="store-data-version")

    async def _poll(self) -> None:
        while self._watched():
            await asyncio.sleep(self.every)
            try:
                version = await self._version()
            except Exception:  # a failing store: the followers' keep-alive re-read still runs
                log.warning("store.data_version_failed", exc_info=True)
                continue
            if version != self._last:
                self._last = version
                for audit_id in list(self._watched()):
                    self._changed(audit_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class PostgresListen:
    """PostgreSQL: one LISTEN connection per process (made on the first watch, kept until close). Every write of an
    audit's rows or status sends NOTIFY in its transaction (delivered on commit) with the audit's id and the writing
    Store's origin; what another origin wrote wakes that audit's followers here. After a lost connection every
    watched audit is woken once (what was sent meanwhile is lost)."""

    def __init__(self, url: str, origin: str, watched: Callable[[], Collection[str]],
                 changed: Callable[[str], None]) -> None:
        self.url, self.origin, self._watched, self._changed = url, origin, watched, changed
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Listening when this returns (or after LISTEN_READY s, when PostgreSQL does not answer)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="store-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), LISTEN_READY)

    async def _listen(self) -> None:
        import psycopg

        lost = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._ready.set()
                    if lost:
                        for audit_id in list(self._watched()):
                            self._changed(audit_id)
                    async for note in conn.notifies():
                        audit_id, _, origin = note.payload.partition(" ")
                        if origin != self.origin:
                            self._changed(audit_id)
            except psycopg.Error:
                log.warning("store.listen_lost", exc_info=True)
            lost = True
            self._ready.clear()
            await asyncio.sleep(LISTEN_RETRY)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
