"""The audit lifecycle: plan -> admit -> queue fairly -> run checks concurrently -> persist each result -> stream.

An audit is admitted (every limit decided) in the same store transaction that creates it, then waits in the fair
queue for a slot. Checks of one audit run concurrently, at most SECURE_MAX_CONNECTIONS_PER_HOST connections at once
to one address across the whole site (relay and proxy, every audit together), under a per-audit deadline. Each
result is stored as soon as it lands and then published to whoever follows the audit's event stream. A check cut
by the deadline still gets its own row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from app import ENGINE_VERSION
from app.access.addresses import budget_key
from app.access.targets import IPAddress, Listener, is_own_listener
from app.admission import Decision, Facts
from app.config import Settings
from app.fairness import AddressSlots, ConnectionSlots, FairQueue, Job
from app.listeners import Arrivals, site_addresses
from app.logs import get_logger
from app.probes import PLANNERS, PlannedCheck, Planner, ProbeOptions
from app.probes.base import SlotFactory
from app.probes.proxy import CanaryTargets
from app.probes.smtp import TAGGED_REASONS
from app.store import Audit, AuditTakenOver, Derived, Store, StoredCheck, new_id
from app.verdicts import CheckResult, TranscriptLine, Verdict, summarize_audit

log = get_logger("audits")

EVIDENCE_BUDGET = 1024 * 1024  # bytes of transcript one audit keeps, counted as its rows show them (JSON)
SWEEP_EVERY = 6  # beats per SECURE_INSTANCE_STALE_SECONDS; the sixth sweeps for the audits of gone instances
CUT_NOTE = "… transcript cut: this audit's evidence reached 1 MiB"


def _line_cost(line: TranscriptLine) -> int:
    """What a line adds to the stored and the public JSON: its object as the store writes it, and a comma."""
    return len(json.dumps(line.to_dict())) + 1


class EvidenceBudget:
    """At most `limit` bytes of transcript per audit, counted as the rows show them: a shared opening counts for
    every row that shows it (the store keeps it once, so the stored bytes are fewer). Rows are admitted in the
    order they are stored; the row that reaches the limit keeps its first lines that fit, every later row keeps
    none, and each cut row ends with CUT_NOTE. Verdict, reason, detail and fingerprint are never touched."""

    def __init__(self, limit: int = EVIDENCE_BUDGET) -> None:
        self.limit = limit
        self.spent = 0
        self.exhausted = False
        self._opening_costs: dict[str, int] = {}

    def admit(self, result: CheckResult) -> CheckResult:
        opening = result.opening
        rest = result.transcript
        kept_opening = None
        if opening is not None and not self.exhausted:
            cost = self._opening_costs.get(opening.key)
            if cost is None:
                cost = self._opening_costs[opening.key] = sum(_line_cost(line) for line in opening.lines)
            if self.spent + cost <= self.limit:
                self.spent += cost
                kept_opening, rest = opening, result.own_lines
        kept: list[TranscriptLine] = []
        for line in rest:
            cost = 0 if self.exhausted else _line_cost(line)
            if self.exhausted or self.spent + cost > self.limit:
                self.exhausted = True
                break
            self.spent += cost
            kept.append(line)
        else:
            if kept_opening is opening:  # nothing cut
                return result
        last = result.transcript[-1].t if result.transcript else 0.0
        shown = kept_opening.lines if kept_opening is not None else ()
        return replace(result, transcript=[*shown, *kept, TranscriptLine(last, "info", CUT_NOTE)], opening=kept_opening)


@dataclass(frozen=True)
class Forbidden:
    """An address of the target that is not tested: it gets a row, never a probe. `reason` is
    `forbidden_address` (the guard refused it) or `host_limit` (beyond SECURE_MAX_HOSTS_PER_AUDIT)."""

    service: str
    address: str
    why: str
    reason: str = "forbidden_address"


@dataclass(frozen=True)
class AuditRequest:
    """What a worker needs to plan an admitted audit's checks again as the web process planned them (with the job
    queue, app/jobs.py: the job carries it as JSON; a resumed run plans from it again)."""

    audit_id: str
    requester_key: str
    hosts: Mapping[str, Sequence[str]]  # per service
    services: tuple[str, ...]
    addresses: tuple[str, ...]  # the budget keys of the tested addresses
    audited_domain: str | None = None
    forbidden: tuple[Forbidden, ...] = ()
    listeners: tuple[Listener, ...] = ()  # the planning process's own listeners: never tested, wherever it runs
    own_addresses: tuple[str, ...] = ()  # and the addresses where its listeners on 0.0.0.0 / :: answer

    def to_json(self) -> dict[str, Any]:
        return {"audit_id": self.audit_id, "requester_key": self.requester_key,
                "hosts": {service: list(hosts) for service, hosts in self.hosts.items()},
                "services": list(self.services), "addresses": list(self.addresses),
                "audited_domain": self.audited_domain,
                "forbidden": [[f.service, f.address, f.why, f.reason] for f in self.forbidden],
                "listeners": [[listener.host, listener.port] for listener in self.listeners],
                "own_addresses": list(self.own_addresses)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRequest:
        """The request a job carries; anything malformed raises ValueError (the job is ours, but checked)."""
        try:
            hosts = {str(service): [str(h) for h in values] for service, values in dict(data["hosts"]).items()}
            forbidden = tuple(Forbidden(*(str(part) for part in item)) for item in data["forbidden"])
            domain = data["audited_domain"]
            listeners = tuple(Listener(str(host), int(port)) for host, port in data["listeners"])
            return cls(audit_id=str(data["audit_id"]), requester_key=str(data["requester_key"]), hosts=hosts,
                       services=tuple(str(s) for s in data["services"]),
                       addresses=tuple(str(a) for a in data["addresses"]),
                       audited_domain=None if domain is None else str(domain), forbidden=forbidden,
                       listeners=listeners, own_addresses=tuple(str(a) for a in data["own_addresses"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed audit request: {exc}") from exc


class AuditJobs(Protocol):
    """The job queue that runs audits in worker processes (app/jobs.py, with PostgreSQL as the store)."""

    # an SQL condition on `audits`: its job can still run (waiting, or running: a dead worker's is put back), so
    # recovery must not interrupt it
    spared: str

    async def defer(self, request: AuditRequest) -> None: ...

    async def position(self, audit_id: str) -> int | None: ...

    async def close(self) -> None: ...


def _by_service(hosts: Sequence[str] | Mapping[str, Sequence[str]],
                services: Sequence[str]) -> Mapping[str, Sequence[str]]:
    return hosts if isinstance(hosts, Mapping) else {service: hosts for service in services}


def _forbidden_row(item: Forbidden) -> PlannedCheck:
    name = f"{item.service}.guard"

    async def run(emit: Any, slot: Any) -> None:
        note = f"not tested: {item.why}"
        await emit(CheckResult(service=item.service, host=item.address, port=0, name=name,
                               verdict=Verdict.UNREACHABLE, reason=item.reason,
                               transcript=[TranscriptLine(0.0, "info", note)], detail=note))
    return PlannedCheck(item.service, item.address, 0, (name,), run)


@dataclass
class Event:
    kind: str  # "check", "done", or "stored": another process changed the audit in the store (read it again)
    seq: int
    data: Any
    derived: Derived | None = None  # a check's: what the site shows of it, made when it was stored


class EventHub:
    """In-process fan-out of an audit's events to its followers."""

    def __init__(self) -> None:
        self._followers: dict[str, set[asyncio.Queue[Event]]] = {}

    def subscribe(self, audit_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._followers.setdefault(audit_id, set()).add(queue)
        return queue

    def unsubscribe(self, audit_id: str, queue: asyncio.Queue[Event]) -> None:
        followers = self._followers.get(audit_id)
        if followers is not None:
            followers.discard(queue)
            if not followers:
                del self._followers[audit_id]

    def publish(self, audit_id: str, event: Event) -> None:
        for queue in self._followers.get(audit_id, ()):
            queue.put_nowait(event)


class AuditRun:
    """The checks of one audit as they run. Each result is admitted to the audit's evidence budget, stored under
    the next seq (seq follows the order in which results are stored) and published. A unit's connections hold a
    slot of its server (budget_key) under the site-wide per-host limit. A unit may emit each name it promised once;
    any promised name it did not emit still gets a row: `error` when it crashed or returned without it,
    `inconclusive` (`audit_deadline`) when the deadline cut it."""

    def __init__(self, audit_id: str, planned: Sequence[PlannedCheck], store: Store, events: EventHub,
                 address_slots: ConnectionSlots, stored: Sequence[StoredCheck] = (), owner: str | None = None) -> None:
        """`stored`: the rows a previous run of this audit stored (a worker that died or stopped): they are kept,
        count against the evidence budget, and their checks are not run again; new rows follow their seq.
        `owner`: rows are stored only while the audit is that instance's; once another worker has taken it over,
        run() stops every unit and raises AuditTakenOver."""
        self.audit_id = audit_id
        self.owner = owner
        self.planned = planned
        self.store = store
        self.events = events
        self.address_slots = address_slots
        self.results: dict[int, CheckResult] = {}  # seq -> the result as stored
        self.budget = EvidenceBudget()
        for check in sorted(stored, key=lambda c: c.seq):
            self.results[check.seq] = check.result
            self.budget.admit(check.result)
        self._seq = max(self.results, default=0)
        self._record_lock = asyncio.Lock()
        kept = {_check_key(result) for result in self.results.values()}
        # id(unit) -> names emitted (or stored by a previous run)
        self._emitted: dict[int, set[str]] = {
            id(unit): {name for name in unit.names if (unit.service, unit.host, unit.port, name) in kept}
            for unit in planned}
        self._kept = {id(unit): frozenset(self._emitted[id(unit)]) for unit in planned}
        self._writes: set[asyncio.Future[None]] = set()  # rows being stored

    async def run(self, deadline: float) -> None:
        """Every unit with a row still missing, at once (a unit whose every row was stored by a previous run is
        not run again); at the deadline the unfinished ones are cancelled and their missing rows filled."""
        tasks = {asyncio.create_task(self._run_unit(unit)): unit for unit in self.planned
                 if any(True for _ in self._missing(unit))}
        if not tasks:
            return
        try:
            pending = await self._wait(set(tasks), deadline)
        except (asyncio.CancelledError, AuditTakenOver):  # the process stops, the audit is handed back or taken
            for task in tasks:  # over: no unit outlives this run, nor a row on its way to the store
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*self._writes, return_exceptions=True)
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.gather(*self._writes, return_exceptions=True)  # rows being stored when their units stopped
            log.warning("audit.deadline", extra={"audit": self.audit_id, "unfinished": len(pending)})
            for task in pending:
                await self._cut_by_deadline(tasks[task], deadline)

    async def _wait(self, pending: set[asyncio.Task[None]], deadline: float) -> set[asyncio.Task[None]]:
        """Until every unit ended or the deadline came: the units still running. A unit that stored a row after
        another worker took the audit over (AuditTakenOver) ends the wait at once, with that error."""
        end = time.monotonic() + deadline
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, end - time.monotonic()),
                                               return_when=asyncio.FIRST_EXCEPTION)
            failed = [error for task in done if not task.cancelled() and (error := task.exception()) is not None]
            for error in failed:
                if isinstance(error, AuditTakenOver):
                    raise error
                log.error("audit.unit_failed", extra={"audit": self.audit_id, "error": repr(error)})
            if not failed:  # every unit ended, or the deadline came
                break
        return pending

    async def _record(self, result: CheckResult) -> None:
        async with self._record_lock:  # seq follows the order in which results are stored
            self._seq += 1
            seq = self._seq
            spent = self.budget.exhausted
            result = self.budget.admit(result)
            if self.budget.exhausted and not spent:
                log.warning("audit.evidence_cut",
                            extra={"audit": self.audit_id, "seq": seq, "bytes": self.budget.spent})
            derived = self.store.derived(result)  # made once here, stored, and sent to every follower
            await self.store.add_check(self.audit_id, seq, result, derived, owner=self.owner)
            self.results[seq] = result
            self.events.publish(self.audit_id, Event("check", seq, result, derived))

    async def _emit(self, unit: PlannedCheck, result: CheckResult) -> None:
        """A unit's row: stored once per promised name; a repeated or unpromised name is a bug, logged, dropped."""
        emitted = self._emitted[id(unit)]
        if result.name in self._kept[id(unit)]:  # stored by a previous run of the audit: that row stays
            return
        if result.name in emitted or result.name not in unit.names:
            log.error("check.unexpected_row", extra={"audit": self.audit_id, "check": result.name})
            return
        emitted.add(result.name)
        # a row on its way to the store finishes even when the deadline cancels its unit: marked as emitted, it
        # would otherwise get neither its own row nor a deadline row
        write = asyncio.ensure_future(self._record(result))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    def _missing(self, unit: PlannedCheck) -> Iterator[str]:
        """The names the unit promised and has not emitted (lazily: each is checked when its turn comes)."""
        return (name for name in unit.names if name not in self._emitted[id(unit)])

    def _slot(self, unit: PlannedCheck) -> SlotFactory:
        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            async with self.address_slots.hold(budget_key(unit.host)):
                yield
        return slot

    async def _run_unit(self, unit: PlannedCheck) -> None:
        try:
            await unit.run(functools.partial(self._emit, unit), self._slot(unit))
        except AuditTakenOver:
            raise  # not the check's fault: run() stops every unit
        except Exception as exc:
            log.exception("check.crashed", extra={"audit": self.audit_id, "host": unit.host, "port": unit.port})
            await self._fill_in_errors(unit, f"the check crashed: {type(exc).__name__}")
        # a unit that returned without a promised row is a bug: say so
        await self._fill_in_errors(unit, "the check ended without a result")

    async def _fill_in_errors(self, unit: PlannedCheck, note: str) -> None:
        for name in self._missing(unit):
            await self._emit(unit, _row(unit, name, Verdict.ERROR, "internal_error", note))

    async def _cut_by_deadline(self, unit: PlannedCheck, deadline: float) -> None:
        for name in self._missing(unit):
            self._emitted[id(unit)].add(name)
            await self._record(_row(unit, name, Verdict.INCONCLUSIVE, "audit_deadline",
                                   f"not finished after {deadline:g} s"))


class Auditor:
    def __init__(self, settings: Settings, store: Store, listeners: Sequence[Listener] = (),
                 planners: dict[str, Planner] | None = None, sink: Arrivals | None = None,
                 canary: CanaryTargets | None = None, own_addresses: Sequence[str | IPAddress] = (),
                 address_slots: ConnectionSlots | None = None, jobs: AuditJobs | None = None) -> None:
        """`jobs`: the job queue (PostgreSQL): admitted audits are deferred to it and run by `worker` processes
        (run_job); without it this process runs them itself, through its FairQueue."""
        self.settings = settings
        self.jobs = jobs
        # where listeners on 0.0.0.0 / :: answer: what start_listeners found (it includes what the settings name),
        # or, for an Auditor built without it (tests, tools), what the settings name
        self.own_addresses = tuple(own_addresses) or site_addresses(settings)
        self.canary = canary
        self.store = store
        self.listeners = list(listeners)
        self.planners = planners or PLANNERS
        self.sink = sink
        self.events = EventHub()
        self.queue = FairQueue(settings.max_running_audits)
        # site-wide per address: this process's, or every process's through Redis (app.shared_slots)
        self.address_slots = address_slots or AddressSlots(settings.max_connections_per_host)
        self._tasks: dict[str, asyncio.Task[str]] = {}
        # this process among the site's instances: every audit it creates is its own (Audit.owner), and its
        # heartbeat (keep_alive) tells the other instances it still runs them
        self.instance_id = new_id()
        # what other processes store of an audit this one follows but does not run: its followers read it again
        store.on_change = self._stored_elsewhere

    async def recover(self, event: str = "audits.interrupted_at_start") -> int:
        """Beat once, then interrupt the audits whose instance is gone (no heartbeat for
        SECURE_INSTANCE_STALE_SECONDS): never an audit of a live instance, this one's or another's."""
        await self.store.beat(self.instance_id)
        stale = self.settings.instance_stale_seconds
        # with the job queue, an audit whose job is waiting, running or to be put back is not orphaned (app/jobs.py)
        if self.jobs is None:
            count = await self.store.interrupt_orphaned(stale)
        else:
            count = await self.store.interrupt_orphaned(stale, self.jobs.spared)
        if count:
            log.warning(event, extra={"count": count, "instance": self.instance_id})
        return count

    async def keep_alive(self) -> None:
        """Until cancelled: beat every sixth of SECURE_INSTANCE_STALE_SECONDS, and every sixth beat (once per bound)
        interrupt the audits of instances that stopped beating (killed, host lost) instead. A failing store is
        logged and tried again: this task must not end while the process serves."""
        interval = self.settings.instance_stale_seconds / SWEEP_EVERY
        for beat in itertools.count(1):
            await asyncio.sleep(interval)
            try:
                if beat % SWEEP_EVERY == 0:
                    await self.recover("audits.interrupted_orphans")
                else:
                    await self.store.beat(self.instance_id)
            except Exception:  # a locked or failing database: the next beat tries again
                log.exception("instance.heartbeat_failed", extra={"instance": self.instance_id})

    def plan(self, hosts: Sequence[str] | Mapping[str, Sequence[str]], services: Sequence[str],
             audit_id: str = "", audited_domain: str | None = None,
             forbidden: Sequence[Forbidden] = (), listeners: Sequence[Listener] = (),
             own_addresses: Sequence[str] = ()) -> list[PlannedCheck]:
        """Checks per service and address (`hosts`: the same addresses for every service, or per service),
        and one `forbidden_address` row per address the guard refused. `listeners`: besides this process's own,
        those of the process that planned the audit first (a worker plans a web process's audit again)."""
        own, addresses = [*self.listeners, *listeners], [*self.own_addresses, *own_addresses]
        options = ProbeOptions.for_audit(self.settings, audit_id, audited_domain, canary=self.canary,
                                         cache=self.store)
        ports = {"relay": self.settings.relay_ports, "proxy": self.settings.proxy_ports}  # blocklist: DNS only
        by_service = _by_service(hosts, services)
        planned: list[PlannedCheck] = []
        for service in services:
            for host in by_service.get(service, ()):
                usable = [p for p in ports.get(service, [])
                          if not is_own_listener(host, p, own, addresses)]
                planned.extend(self.planners[service](host, usable, options))
        planned.extend(_forbidden_row(item) for item in forbidden if item.service in services)
        return planned

    def _prepare(self, *, target: str, requester: str, hosts: Sequence[str] | Mapping[str, Sequence[str]],
                 services: Sequence[str], previous_id: str | None, verification_id: str | None,
                 audited_domain: str | None, forbidden: Sequence[Forbidden],
                 requester_key: str | None) -> tuple[Audit, list[PlannedCheck], AuditRequest]:
        audit_id = new_id()
        planned = self.plan(hosts, services, audit_id, audited_domain, forbidden)
        by_service = _by_service(hosts, services)
        tested = list(dict.fromkeys(a for s in services for a in by_service.get(s, ())))
        all_hosts = list(dict.fromkeys([*tested, *(f.address for f in forbidden if f.service in services)]))
        audit = Audit(id=audit_id, created_at=time.time(), status="queued", target=target, requester=requester,
                      hosts=all_hosts, services=list(services), planned=sum(len(c.names) for c in planned),
                      engine_version=ENGINE_VERSION, previous_id=previous_id, verification_id=verification_id,
                      requester_key=requester_key or requester, owner=self.instance_id)
        request = AuditRequest(audit_id=audit_id, requester_key=audit.requester_key or requester,
                               hosts={s: list(by_service.get(s, ())) for s in services}, services=tuple(services),
                               addresses=tuple(dict.fromkeys(budget_key(a) for a in tested)),
                               audited_domain=audited_domain, forbidden=tuple(forbidden),
                               listeners=tuple(self.listeners),
                               own_addresses=tuple(str(a) for a in self.own_addresses))
        return audit, planned, request

    async def start(self, *, target: str, requester: str, hosts: Sequence[str] | Mapping[str, Sequence[str]],
                    services: Sequence[str], previous_id: str | None = None, verification_id: str | None = None,
                    audited_domain: str | None = None, forbidden: Sequence[Forbidden] = (),
                    requester_key: str | None = None) -> Audit:
        """Create and queue an audit without any limit (tests and tools; the site goes through admit())."""
        audit, planned, request = self._prepare(
            target=target, requester=requester, hosts=hosts, services=services, previous_id=previous_id,
            verification_id=verification_id, audited_domain=audited_domain, forbidden=forbidden,
            requester_key=requester_key)
        await self.store.create_audit(audit, request.addresses)
        await self._enqueue(audit, planned, request)
        return audit

    async def admit(self, *, target: str, requester: str, requester_key: str,
                    hosts: Sequence[str] | Mapping[str, Sequence[str]], services: Sequence[str],
                    decide: Callable[[Facts], Decision], previous_id: str | None = None,
                    verification_id: str | None = None, audited_domain: str | None = None,
                    forbidden: Sequence[Forbidden] = ()) -> tuple[Decision, Audit | None]:
        """Decide every limit and create the audit in one store transaction; queue it when admitted."""
        audit, planned, request = self._prepare(
            target=target, requester=requester, hosts=hosts, services=services, previous_id=previous_id,
            verification_id=verification_id, audited_domain=audited_domain, forbidden=forbidden,
            requester_key=requester_key)
        decision = await self.store.admit(audit, request.addresses, self.settings.target_cooldown, decide)
        if decision.outcome != "create":
            log.info("audit.refused" if decision.outcome == "refused" else "audit.cached",
                     extra={"target": target, "requester": requester, "code": decision.code,
                            "latest": decision.latest.id if decision.latest else None})
            return decision, None
        await self._enqueue(audit, planned, request)
        return decision, audit

    async def _enqueue(self, audit: Audit, planned: list[PlannedCheck], request: AuditRequest) -> None:
        """To the job queue (a worker runs it), or to this process's FairQueue."""
        log.info("audit.created", extra={"audit": audit.id, "target": audit.target, "requester": audit.requester,
                                         "hosts": audit.hosts, "services": audit.services, "planned": audit.planned,
                                         "forbidden": len(request.forbidden), "previous": audit.previous_id})
        if self.jobs is not None:
            try:
                await self.jobs.defer(request)
            except Exception as exc:  # the queue's database failed: the audit can never run, say so
                log.exception("audit.defer_failed", extra={"audit": audit.id})
                await self.store.finish_audit(audit.id, "failed", None, f"internal error: {type(exc).__name__}")
                audit.status = "failed"
            return

        def start() -> None:
            task = asyncio.create_task(self._run(audit, planned), name=f"audit-{audit.id}")
            self._tasks[audit.id] = task
            task.add_done_callback(lambda _t: self._done(audit.id))
        self.queue.add(Job(audit.id, request.requester_key, frozenset(request.addresses), start))

    async def queue_position(self, audit_id: str) -> int | None:
        """A queued audit's place in line (1: the next to run): in the job queue, or in this process's FairQueue."""
        if self.jobs is not None:
            return await self.jobs.position(audit_id)
        return self.queue.position(audit_id)

    async def run_job(self, request: AuditRequest) -> str:
        """A worker runs a job of the queue: the audit's checks planned again from `request`, the rows a previous
        run stored kept (their checks are not run again), the rest run; this instance becomes its owner. Returns
        what became of it: `done`/`failed`, `skipped` (no longer unfinished: nothing to do) or `taken_over`
        (another worker resumed it while this one was taken for dead)."""
        audit = await self.store.get_audit(request.audit_id)
        if audit is None or audit.finished or not await self.store.claim(audit.id, self.instance_id):
            log.info("audit.job_skipped", extra={"audit": request.audit_id})
            return "skipped"
        if audit.checks:
            log.warning("audit.resumed", extra={"audit": audit.id, "kept": len(audit.checks),
                                                "instance": self.instance_id})
        planned = self.plan(request.hosts, request.services, audit.id, request.audited_domain, request.forbidden,
                            request.listeners, request.own_addresses)
        return await self._run(audit, planned, audit.checks)

    def _done(self, audit_id: str) -> None:
        self._tasks.pop(audit_id, None)
        self.queue.finished(audit_id)

    async def _run(self, audit: Audit, planned: list[PlannedCheck], stored: Sequence[StoredCheck] = ()) -> str:
        try:
            await self.store.mark_running(audit.id)
            log.info("audit.running", extra={"audit": audit.id})
            started = time.monotonic()
            results = await self._run_checks(audit.id, planned, stored)
            summary = summarize_audit(((r.service, r.verdict, r.reason) for r in results), audit.services)
            await self.store.finish_audit(audit.id, "done", summary, owner=self._fence)
            log.info("audit.done", extra={"audit": audit.id, "summary": summary, "checks": len(results),
                                          "seconds": round(time.monotonic() - started, 3)})
            self.events.publish(audit.id, Event("done", -1, {"status": "done", "summary": summary}))
            return "done"
        except asyncio.CancelledError:
            if self.jobs is not None:  # a worker stops: its job goes back to the queue, another worker resumes it
                raise
            # the site is shutting down: what ran is stored, the rest can never finish
            await asyncio.shield(self.store.finish_audit(audit.id, "interrupted", None, "the site shut down"))
            self.events.publish(audit.id, Event("done", -1, {"status": "interrupted", "summary": None}))
            raise
        except AuditTakenOver:  # this worker was taken for dead: the worker that resumed the audit ends it
            log.warning("audit.taken_over", extra={"audit": audit.id, "instance": self.instance_id})
            return "taken_over"
        except Exception as exc:  # a bug of ours: say so, never leave the audit hanging
            log.exception("audit.failed", extra={"audit": audit.id})
            await self.store.finish_audit(audit.id, "failed", None, f"internal error: {type(exc).__name__}",
                                          owner=self._fence)
            self.events.publish(audit.id, Event("done", -1, {"status": "failed", "summary": None}))
            return "failed"

    @property
    def _fence(self) -> str | None:
        """With the job queue, an audit ends only while it is still ours (another worker may have taken it over
        when this one was taken for dead); without it, every audit this process runs is its own."""
        return self.instance_id if self.jobs is not None else None

    async def _run_checks(self, audit_id: str, planned: list[PlannedCheck],
                          stored: Sequence[StoredCheck] = ()) -> list[CheckResult]:
        run = AuditRun(audit_id, planned, self.store, self.events, self.address_slots, stored, self._fence)
        await run.run(self.settings.audit_deadline)
        await self._await_deliveries(audit_id, run.results)
        return list(run.results.values())

    async def _await_deliveries(self, audit_id: str, results: dict[int, CheckResult]) -> None:
        """Give relayed probes up to SECURE_SINK_WAIT seconds to reach our sink, and messages accepted for an address
        at the server itself up to SECURE_LOCAL_FORM_WAIT (from the same start); delivered() records arrivals."""
        waiting = {r.tag for r in results.values() if r.reason == "accepted_unconfirmed" and r.tag}
        local = {r.tag for r in results.values() if r.reason == "accepted_as_local" and r.tag}
        if not (waiting or local) or self.sink is None:
            return
        started = time.monotonic()
        arrived = await self.sink.wait_for(waiting, self.settings.sink_wait) if waiting else set()
        left = max(0.0, self.settings.local_form_wait - (time.monotonic() - started))
        arrived |= await self.sink.wait_for(local, left) if local else set()
        log.info("audit.deliveries", extra={"audit": audit_id, "expected": len(waiting), "local": len(local),
                                            "arrived": len(arrived)})
        for seq, result in list(results.items()):
            if result.tag in arrived:
                # the message may have arrived before its row was stored: record it now (delivered() is idempotent)
                await self.delivered(result.tag)
                results[seq] = confirmed(result)

    async def delivered(self, tag: str) -> None:
        """Our sink received a tagged message: its check becomes `open`, `delivered`, confirmed (also late)."""
        found = await self.store.find_check_by_tag(tag)
        if found is None:
            return
        audit_id, stored = found
        if stored.result.reason not in TAGGED_REASONS:
            if stored.result.confirmed:  # confirmed by the listeners process: news to this process's followers
                self.events.publish(audit_id, Event("check", stored.seq, stored.result, stored.derived))
            return
        result = confirmed(stored.result)
        derived = self.store.derived(result)
        await self.store.update_check(audit_id, stored.seq, result, derived)
        log.info("check.delivered", extra={"audit": audit_id, "check": result.name, "port": result.port})
        self.events.publish(audit_id, Event("check", stored.seq, result, derived))
        if stored.result.verdict is not Verdict.OPEN:  # accepted_as_local: the row was closed, now it is open
            await self._resummarize(audit_id)

    async def _resummarize(self, audit_id: str) -> None:
        """A finished audit's summary again, from its stored rows (a running audit sums up when it ends)."""
        audit = await self.store.get_audit(audit_id, transcripts=False)
        if audit is None or audit.status != "done":
            return
        summary = summarize_audit(((c.result.service, c.result.verdict, c.result.reason) for c in audit.checks),
                                  audit.services)
        await self.store.set_summary(audit_id, summary)
        log.info("audit.resummarized", extra={"audit": audit_id, "summary": summary})

    def _stored_elsewhere(self, audit_id: str) -> None:
        self.events.publish(audit_id, Event("stored", -1, None))

    async def follow(self, audit_id: str, keepalive: float = 15.0) -> AsyncIterator[Event | None]:
        """Every event of an audit: the stored checks first, then the live ones, then `done`.

        A row that changes after it was sent (our sink received its message: `confirmed`) is sent again with its
        final state, always before `done`. Yields None as a keep-alive when nothing happened for `keepalive` s.
        An audit another process runs is watched in the store (Store.watch): each change it stores there wakes
        the follower, who reads the audit again.
        """
        queue = self.events.subscribe(audit_id)  # before reading the store, so nothing falls in between
        sent = _SentStates()
        watched = False
        try:
            while True:
                audit = await self.store.get_audit(audit_id)
                if audit is None:
                    return
                for stored in audit.checks:
                    event = Event("check", stored.seq, stored.result, stored.derived)
                    if sent.news(event):
                        yield event
                if audit.finished:
                    yield Event("done", -1, {"status": audit.status, "summary": audit.summary})
                    return
                if not watched and audit.owner != self.instance_id:
                    await self.store.watch(audit_id)
                    watched = True
                    continue  # read it again: what was stored before the watch began
                async with contextlib.aclosing(_live_events(queue, keepalive, sent)) as live:
                    async for live_event in live:
                        yield live_event
        finally:
            self.events.unsubscribe(audit_id, queue)
            if watched:
                self.store.unwatch(audit_id)

    async def shutdown(self) -> None:
        for job in self.queue.drain():  # never started: they can never finish now
            await self.store.finish_audit(job.audit_id, "interrupted", None, "the site shut down")
            self.events.publish(job.audit_id, Event("done", -1, {"status": "interrupted", "summary": None}))
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # anything of ours still unfinished (none, unless a task ended oddly), and our row: never another's audits;
        # with the job queue nothing is interrupted: the queue holds our audits' jobs, other workers run them
        await self.store.leave(self.instance_id, interrupt=self.jobs is None)


class _SentStates:
    """What one follower has been sent: each row's seq -> its state (verdict, reason, confirmed)."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[str, str, bool]] = {}

    def news(self, event: Event) -> bool:
        """Whether the follower has not seen this row in this state yet; from now on it has."""
        state = _state(event.data)
        if self._sent.get(event.seq) == state:
            return False
        self._sent[event.seq] = state
        return True


async def _live_events(queue: asyncio.Queue[Event], keepalive: float,
                       sent: _SentStates) -> AsyncGenerator[Event | None, None]:
    """The live check events that are news to the follower, until `done`; or one None when nothing happened for
    `keepalive` s. Either way the follower then reads the store again. Another process's change ("stored")
    also sends it to the store, once for everything queued so far: each queued event was published after its row
    was committed, so the store holds it."""
    try:
        while True:
            event = await asyncio.wait_for(queue.get(), keepalive)
            if event.kind == "stored":
                while not queue.empty():
                    queue.get_nowait()
                return
            if event.kind == "done":
                return  # re-read the store: it holds every check in its final state, and the status
            if sent.news(event):
                yield event
    except TimeoutError:
        yield None


def _state(result: CheckResult) -> tuple[str, str, bool]:
    return (str(result.verdict), result.reason, result.confirmed)


def _check_key(result: CheckResult) -> tuple[str, str, int, str]:
    return (result.service, result.host, result.port, result.name)


def _row(unit: PlannedCheck, name: str, verdict: Verdict, reason: str, note: str) -> CheckResult:
    return CheckResult(service=unit.service, host=unit.host, port=unit.port, name=name, verdict=verdict,
                       reason=reason, transcript=[TranscriptLine(0.0, "info", note)], detail=note)


def confirmed(result: CheckResult) -> CheckResult:
    last = result.transcript[-1].t if result.transcript else 0.0
    note = "our sink received the tagged message: this server relays mail for strangers"
    return replace(result, verdict=Verdict.OPEN, reason="delivered", confirmed=True, detail=note,
                   transcript=[*result.transcript, TranscriptLine(last, "info", note)])
