"""Retention: finished audits older than SECURE_RETENTION_DAYS, and verifications expired longer ago, are deleted in
the background, in batches that each hold the store's only thread for a few tens of milliseconds.

Each batch is one transaction, followed by a checkpoint of the write-ahead log on a connection and thread of its own
(the store goes on serving during it). Between two batches the store is free: every store call queued meanwhile
(a page, `/healthz`, an audit storing a check) runs before the next batch, so a store call waits behind one batch
at most. The first run begins as the site starts serving
(a task beside it, never awaited by the start-up), then one run per hour.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.logs import get_logger
from app.store import PurgeBatch, Store

log = get_logger("retention")

HOLD_TARGET = 0.04  # seconds a batch should hold the store, commit included
HOLD_LIMIT = 0.1  # the goal: no hold longer than this (counted in the report when one was)
LIMIT_START = 4  # audits in the first batch, before any measurement
LIMIT_MAX = 1000
EVERY = 3600.0  # seconds between two runs


@dataclass
class PurgeReport:
    audits: int = 0
    verifications: int = 0
    batches: int = 0
    longest_hold: float = 0.0  # seconds: the longest single hold of the store (a batch with its commit)
    over_limit: int = 0  # holds longer than HOLD_LIMIT (a busy machine, a slow disk)
    seconds: float = 0.0  # the whole run, pauses between batches included

    def hold(self, seconds: float) -> None:
        self.longest_hold = max(self.longest_hold, seconds)
        self.over_limit += seconds > HOLD_LIMIT


@dataclass
class Pace:
    """How many audits the next batch deletes: as many as fit in the target at the measured cost per audit
    (deletes and commit; smoothed, so one slow batch does not swing it), at most twice the last batch. A batch
    also stops deleting once `budget` (most of the target) has gone, leaving the rest to its commit."""
    target: float = HOLD_TARGET
    limit: int = LIMIT_START
    per_audit: float | None = None  # seconds

    @property
    def budget(self) -> float:
        return self.target * 0.6

    def after(self, batch: PurgeBatch) -> None:
        if batch.audits == 0:
            return
        cost = batch.held / batch.audits
        self.per_audit = cost if self.per_audit is None else 0.7 * self.per_audit + 0.3 * cost
        self.limit = max(1, min(LIMIT_MAX, self.limit * 2, int(self.target / self.per_audit)))


async def purge(store: Store, cutoff: float, target: float = HOLD_TARGET,
                on_batch: Callable[[PurgeBatch], None] | None = None) -> PurgeReport:
    """Delete everything expired before `cutoff`, one short transaction at a time, yielding the store between
    them. `on_batch` sees each batch (tests, the bench)."""
    report, pace = PurgeReport(), Pace(target=target)
    start = time.perf_counter()
    while True:
        batch = await store.purge_batch(cutoff, pace.limit, pace.budget)
        report.batches += 1
        report.audits += batch.audits
        report.verifications += batch.verifications
        report.hold(batch.held)
        if on_batch is not None:
            on_batch(batch)
        await store.checkpoint()  # off the store's thread: the requests that waited for this batch run meanwhile
        if batch.done:
            break
        pace.after(batch)
        await asyncio.sleep(0)  # and so do those queued during the checkpoint, before the next batch
    report.seconds = time.perf_counter() - start
    return report


async def keep_purging(store: Store, days: int, every: float = EVERY) -> None:
    """The retention task: a run now, then one every `every` seconds. A run that fails (a batch raised) is logged
    and the next run comes as planned; what it had deleted stays deleted."""
    while True:
        try:
            report = await purge(store, time.time() - days * 86400)
        except (sqlite3.Error, OSError) as exc:
            log.error("audits.purge_failed", extra={"error": f"{type(exc).__name__}: {exc}", "retention_days": days})
        else:
            if report.audits or report.verifications:
                log.info("audits.purged", extra={
                    "count": report.audits, "verifications": report.verifications, "retention_days": days,
                    "batches": report.batches, "longest_hold_ms": round(report.longest_hold * 1000, 1),
                    "holds_over_100ms": report.over_limit,
                    "seconds": round(report.seconds, 3)})
        await asyncio.sleep(every)
