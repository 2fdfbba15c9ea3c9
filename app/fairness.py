"""Fair use of the site's capacity and of each target's patience.

- FairQueue: admitted audits wait here for one of SECURE_MAX_RUNNING_AUDITS slots. Requesters take turns
  (round-robin), so one requester's burst delays another requester's audit by at most one slot; and an audit
  whose address is already under test waits, so one address is never audited twice at once.
- AddressSlots: at most SECURE_MAX_CONNECTIONS_PER_HOST connections to one address at once, site-wide (all
  audits together), keyed by the server an address lands on (access.addresses.budget_key).

Both live in the process that runs audits. With SECURE_LIMITS_STORAGE=redis://... the connection slots live in
Redis instead (app.shared_slots.RedisSlots, the same `hold`), so the per-address cap holds across processes; the
queue (and its one-audit-per-address rule) stays per process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Job:
    audit_id: str
    requester_key: str
    addresses: frozenset[str]  # budget keys
    start: Callable[[], None] = field(repr=False)  # called once, when the job gets its slot


class FairQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._waiting: dict[str, deque[Job]] = {}  # requester -> its jobs, oldest first
        self._turns: deque[str] = deque()  # requesters in the order of their next turn
        self._running: dict[str, Job] = {}
        self._busy: set[str] = set()  # addresses under test: each by exactly one running job

    def add(self, job: Job) -> None:
        if job.requester_key not in self._waiting:
            self._waiting[job.requester_key] = deque()
            self._turns.append(job.requester_key)
        self._waiting[job.requester_key].append(job)
        self._pump()

    def finished(self, audit_id: str) -> None:
        job = self._running.pop(audit_id, None)
        if job is not None:
            self._busy -= job.addresses
        self._pump()

    def drain(self) -> list[Job]:
        """Every waiting job, removed (the site is shutting down)."""
        jobs = [job for queue in self._waiting.values() for job in queue]
        self._waiting.clear()
        self._turns.clear()
        return jobs

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    def position(self, audit_id: str) -> int | None:
        """1 for the audit that runs next, in turn order (an address under test may let a later one go first)."""
        for index, job in enumerate(self._order(), start=1):
            if job.audit_id == audit_id:
                return index
        return None

    def _order(self) -> list[Job]:
        queues = [list(self._waiting[key]) for key in self._turns]
        order: list[Job] = []
        for rank in range(max((len(q) for q in queues), default=0)):
            order.extend(q[rank] for q in queues if rank < len(q))
        return order

    def _next(self) -> Job | None:
        """The first job, in turn order, whose addresses are all free; its requester goes to the back."""
        for _ in range(len(self._turns)):
            key = self._turns[0]
            queue = self._waiting[key]
            job = next((j for j in queue if self._busy.isdisjoint(j.addresses)), None)
            self._turns.rotate(-1)
            if job is not None:
                queue.remove(job)
                if not queue:
                    del self._waiting[key]
                    self._turns.remove(key)
                return job
        return None

    def _pump(self) -> None:
        while len(self._running) < self.capacity:
            job = self._next()
            if job is None:
                return
            self._running[job.audit_id] = job
            self._busy |= job.addresses
            job.start()


class ConnectionSlots(Protocol):
    """What an audit holds while it talks to an address: AddressSlots here, or RedisSlots across processes."""

    def hold(self, key: str) -> AbstractAsyncContextManager[None]: ...


class AddressSlots:
    """One semaphore per address, shared by every audit; dropped when nobody holds or waits for it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # address -> (slots, [users])

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        address = key
        semaphore, users = self._slots.setdefault(address, (asyncio.Semaphore(self.limit), [0]))
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._slots[address]

    def __len__(self) -> int:
        return len(self._slots)
