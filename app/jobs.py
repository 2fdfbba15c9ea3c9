"""The audits' job queue when PostgreSQL is the store: procrastinate (https://procrastinate.readthedocs.io), whose
tables live in the site's own database.

- `serve` admits an audit (one store transaction) and defers a job to the `audits` queue; the job carries the
  AuditRequest (per-service hosts, services, audited domain, forbidden rows), from which a worker plans the same
  checks. `secure-your-server worker` processes run the jobs (Auditor.run_job).
- A worker that dies (kill -9, host lost) stops renewing its procrastinate heartbeat; every live worker looks for
  such stalled jobs every RETRY_EVERY seconds and puts them back in the queue (one worker at a time, under an
  advisory lock, so that no job is ever put back twice). The next run keeps the rows already stored and runs the
  rest, as the new owner. A worker that is stopped (SIGTERM) hands its running jobs back the same way. A job runs
  at most MAX_RUNS times: beyond, its audit is `failed`.
- Recovery (Auditor.recover): an unfinished audit is interrupted only when its owner stopped beating AND its job can
  no longer run (no job waiting or running: a stalled one counts as running, it will be put back).
- Site-wide capacity: at most SECURE_MAX_RUNNING_AUDITS audits run at once whatever the number of workers: each
  running audit holds one of that many PostgreSQL advisory locks (the worker's connection holds them; they go with
  it when the worker dies). A job waits for a free one before its audit starts; the audit stays `queued`.
- Fairness: a requester's job gets priority minus the number of its own jobs already waiting, so requesters take
  turns as in app.fairness.FairQueue; each job is locked by its first address (procrastinate runs one job per lock at
  once, oldest first), so one address is not audited by two workers at once. queue_position counts the waiting jobs
  that will be fetched before this one.

procrastinate's schema is applied once, by the first process that finds it missing, under an advisory lock (several
processes starting at once wait for each other); an upgrade of procrastinate that changes its schema needs its
migrations applied by the operator (README).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from app.audits import AuditRequest
from app.config import Settings
from app.logs import get_logger
from app.store import Store

log = get_logger("jobs")

QUEUE = "audits"
TASK = "run_audit"
MAX_RUNS = 3  # runs of one audit's job: the first, and two more after its worker died or stopped
HEARTBEAT = 5.0  # seconds between a worker's procrastinate heartbeats
STALLED = 15.0  # a worker silent this long is gone: its running jobs go back to the queue
RETRY_EVERY = 5.0  # seconds between two looks for stalled jobs
SLOT_WAIT = 0.5  # seconds between two tries for a site-wide running slot
STOP_GRACE = 5.0  # seconds a stopping worker lets its audits run before handing them back to the queue
FETCH_EVERY = 1.0  # seconds between two polls for jobs, besides LISTEN/NOTIFY (a job held back by its address)
# advisory lock keys (two 32-bit ints): our namespace, then what is locked
LOCKS = 0x5EC5
SCHEMA_LOCK, RETRY_LOCK, SLOT_BASE = 1, 2, 1000

_HAS_SCHEMA = "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS found"
_INDEX = ("CREATE INDEX IF NOT EXISTS procrastinate_jobs_audit_id ON procrastinate_jobs ((args->>'audit_id'))"
          " WHERE queue_name = 'audits'")
_WAITING_OF = ("SELECT COUNT(*) AS n FROM procrastinate_jobs WHERE queue_name = 'audits' AND status = 'todo'"
               " AND args->>'requester_key' = %(key)s")
_POSITION = (
    "SELECT 1 + (SELECT COUNT(*) FROM procrastinate_jobs o WHERE o.queue_name = j.queue_name AND o.status = 'todo'"
    " AND (o.priority > j.priority OR (o.priority = j.priority AND o.id < j.id))) AS position"
    " FROM procrastinate_jobs j WHERE j.queue_name = 'audits' AND j.args->>'audit_id' = %(audit_id)s"
    " AND j.status = 'todo' ORDER BY j.id DESC LIMIT 1")
# an audit whose job can still run: waiting, or running (a dead worker's is put back): recovery spares it
SPARED = ("EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE j.queue_name = 'audits'"
          " AND j.args->>'audit_id' = audits.id AND j.status IN ('todo', 'doing'))")

RunAudit = Callable[[AuditRequest], Awaitable[str]]


def uses_queue(settings: Settings) -> bool:
    """PostgreSQL as the store: audits run through the job queue, in worker processes."""
    return settings.uses_postgres


def hand_back() -> Any:
    """procrastinate's retry strategy for our jobs: a run cut by its worker's stop (cancelled) goes back to the
    queue at once, up to MAX_RUNS runs; anything else is not retried (Auditor.run_job catches its own errors).
    (procrastinate, the `postgres` extra, is imported only here and below: where the queue is used.)"""
    from procrastinate import BaseRetryStrategy, RetryDecision, exceptions, jobs

    class HandBack(BaseRetryStrategy):
        def get_retry_decision(self, *, exception: BaseException, job: jobs.Job) -> RetryDecision | None:
            if not isinstance(exception, asyncio.CancelledError | exceptions.JobAborted) \
                    or job.attempts + 1 >= MAX_RUNS:
                return None
            return RetryDecision(retry_in={"seconds": 0})

    return HandBack()


class AuditQueue:
    """The job queue of the audits (see the module's doc). open() before use, close() after."""

    spared = SPARED

    def __init__(self, settings: Settings, store: Store) -> None:
        import procrastinate

        self.settings = settings
        self.store = store
        self.conninfo = settings.database_url
        self.capacity = settings.max_running_audits
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=self.conninfo, min_size=1, max_size=4))
        self._locks: Any = None  # a psycopg.AsyncConnection: holds our advisory locks (running slots, retry)
        self._locks_lock = asyncio.Lock()
        self._held: set[int] = set()  # the running slots this worker holds

    async def open(self) -> None:
        await ensure_schema(self.conninfo)
        await self.app.open_async()

    async def close(self) -> None:
        if self._locks is not None:
            await self._locks.close()
            self._locks = None
        await self.app.close_async()

    # --- web processes: defer, and where a job stands ------------------------------------------------------
    async def defer(self, request: AuditRequest) -> None:
        connector = self.app.connector
        waiting = await connector.execute_query_one_async(_WAITING_OF, key=request.requester_key)
        lock = f"address:{min(request.addresses)}" if request.addresses else None
        await self.app.configure_task(TASK, queue=QUEUE, priority=-int(waiting["n"]), lock=lock).defer_async(
            audit_id=request.audit_id, requester_key=request.requester_key, request=request.to_json())
        log.info("audit.deferred", extra={"audit": request.audit_id, "priority": -int(waiting["n"]), "lock": lock})

    async def position(self, audit_id: str) -> int | None:
        rows = await self.app.connector.execute_query_all_async(_POSITION, audit_id=audit_id)
        return int(rows[0]["position"]) if rows else None

    # --- workers ----------------------------------------------------------------------------------------------
    def register(self, run: RunAudit) -> None:
        """The task a worker runs: each job, under a site-wide slot, through `run` (Auditor.run_job)."""
        from procrastinate import JobContext

        async def run_audit(context: JobContext, audit_id: str, requester_key: str,
                            request: dict[str, Any]) -> str:
            parsed = AuditRequest.from_json(request)
            if context.job.attempts >= MAX_RUNS:  # put back after every run died: it must not kill the next one
                audit = await self.store.get_audit(parsed.audit_id, with_checks=False)
                if audit is not None and not audit.finished:
                    await self.fail(parsed.audit_id, f"its worker stopped {context.job.attempts} times")
                return "failed"
            async with self.slot():
                return await run(parsed)

        self.app.task(name=TASK, queue=QUEUE, pass_context=True, retry=hand_back())(run_audit)

    async def fail(self, audit_id: str, why: str) -> None:
        log.error("audit.gave_up", extra={"audit": audit_id, "why": why})
        await self.store.finish_audit(audit_id, "failed", None, f"interrupted: {why}")

    async def _lock_connection(self) -> Any:
        import psycopg

        if self._locks is None or self._locks.closed:
            self._locks = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        return self._locks

    async def _try_lock(self, key: int) -> bool:
        import psycopg

        async with self._locks_lock:
            try:
                return await self._lock_on(await self._lock_connection(), key)
            except psycopg.OperationalError:
                # the session was ended (a database restart, a failover; its locks went with it): once more, on a
                # new one (_lock_connection makes it), rather than failing the job that asked
                if not self._locks.closed:
                    raise
                log.warning("job.locks_reconnected", extra={"key": key})
            return await self._lock_on(await self._lock_connection(), key)

    @staticmethod
    async def _lock_on(connection: Any, key: int) -> bool:
        cursor = await connection.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCKS, key))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def _unlock(self, key: int) -> None:
        import psycopg

        async with self._locks_lock:
            if self._locks is not None and not self._locks.closed:
                with contextlib.suppress(psycopg.OperationalError):  # the session ended, and its locks with it
                    await self._locks.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCKS, key))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """One of the site's SECURE_MAX_RUNNING_AUDITS running slots, waited for (every SLOT_WAIT s)."""
        while True:
            slot = await self._take_slot()
            if slot is None:
                await asyncio.sleep(SLOT_WAIT)
                continue
            try:
                yield slot
            finally:
                await asyncio.shield(self._unlock(SLOT_BASE + slot))
                self._held.discard(slot)
            return

    async def _take_slot(self) -> int | None:
        """A free slot, locked; None when every slot is taken. A session may take an advisory lock it holds again:
        the slots this worker holds, or is trying, are skipped (reserved before the await, so that two of its jobs
        never try the same one)."""
        for slot in range(self.capacity):
            if slot in self._held:
                continue
            self._held.add(slot)
            try:
                if await self._try_lock(SLOT_BASE + slot):
                    return slot
            except BaseException:
                self._held.discard(slot)
                raise
            self._held.discard(slot)
        return None

    async def retry_stalled(self) -> int:
        """Put the jobs of gone workers (no heartbeat for STALLED s) back in the queue: one worker at a time."""
        if not await self._try_lock(RETRY_LOCK):
            return 0
        try:
            manager = self.app.job_manager
            stalled = await manager.get_stalled_jobs(queue=QUEUE, task_name=TASK, seconds_since_heartbeat=STALLED)
            for job in stalled:
                await manager.retry_job(job)
                log.warning("job.stalled_retried", extra={"job": job.id, "audit": job.task_kwargs.get("audit_id"),
                                                          "worker": job.worker_id, "attempts": job.attempts})
            return len(list(stalled))
        finally:
            await self._unlock(RETRY_LOCK)

    async def keep_retrying_stalled(self) -> None:
        """Until cancelled: retry_stalled every RETRY_EVERY s; a failing database is logged and tried again."""
        while True:
            await asyncio.sleep(RETRY_EVERY)
            try:
                await self.retry_stalled()
            except Exception:  # the database went away a moment: the next round tries again
                log.exception("job.stalled_retry_failed")

    async def work(self, concurrency: int, name: str, signals: bool = True) -> None:
        """Run jobs until SIGTERM / SIGINT (`signals`), or until cancelled; running audits then get STOP_GRACE s,
        and are handed back."""
        await self.app.run_worker_async(
            queues=[QUEUE], name=name, concurrency=concurrency, update_heartbeat_interval=HEARTBEAT,
            stalled_worker_timeout=STALLED, shutdown_graceful_timeout=STOP_GRACE,
            fetch_job_polling_interval=FETCH_EVERY, install_signal_handlers=signals,
            delete_jobs="successful")  # the table keeps only jobs waiting, running, or that failed (few)


async def ensure_schema(conninfo: str) -> bool:
    """procrastinate's schema, applied if missing, under an advisory lock; True when this call applied it."""
    import psycopg
    from procrastinate.schema import SchemaManager

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
        await connection.execute("SELECT pg_advisory_lock(%s, %s)", (LOCKS, SCHEMA_LOCK))
        try:
            row = await (await connection.execute(_HAS_SCHEMA)).fetchone()
            applied = not (row and row[0])
            if applied:
                async with connection.transaction():
                    await connection.execute(SchemaManager.get_schema())
                log.info("jobs.schema_applied")
            await connection.execute(_INDEX)
            return applied
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCKS, SCHEMA_LOCK))
