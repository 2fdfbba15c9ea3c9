"""The job queue's parts (app/jobs.py, Auditor.run_job): a resumed run keeps what a dead worker stored, and the
queue's own SQL against the real PostgreSQL (schema applied once, fair order, site-wide slots, stalled jobs put back,
recovery that spares an audit whose job can still run). The whole site in processes: tests/test_workers_process.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.audits import Auditor, AuditRequest, Forbidden
from app.probes import PlannedCheck
from app.store import Audit
from app.verdicts import CheckResult, Verdict

PORTS = [20001, 20002, 20003, 20004]


class FakeJobs:
    """The queue as the Auditor sees it, in memory."""

    spared = "id = 'never'"

    def __init__(self) -> None:
        self.deferred: list[AuditRequest] = []

    async def defer(self, request: AuditRequest) -> None:
        self.deferred.append(request)

    async def position(self, audit_id: str) -> int | None:
        return 1 + [r.audit_id for r in self.deferred].index(audit_id)

    async def close(self) -> None:
        pass


def counting_planner(ran: list[int], hold: asyncio.Event | None = None):
    """One unit per port promising two rows (`proxy.a`, `proxy.b`); `ran` records each unit that runs."""
    def plan(host, ports, options):
        def unit(port: int) -> PlannedCheck:
            async def run(emit, slot):
                ran.append(port)
                if hold is not None:
                    await hold.wait()
                for name in ("proxy.a", "proxy.b"):
                    await emit(CheckResult("proxy", host, port, name, Verdict.CLOSED, "destination_denied"))
            return PlannedCheck("proxy", host, port, ("proxy.a", "proxy.b"), run)
        return [unit(port) for port in ports]
    return plan


async def queued_audit(settings, store, jobs: FakeJobs, ran: list[int]) -> tuple[Audit, AuditRequest]:
    settings.proxy_ports = PORTS
    web = Auditor(settings, store, planners={"proxy": counting_planner(ran)}, jobs=jobs)
    audit = await web.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"],
                            forbidden=[Forbidden("proxy", "192.0.2.1", "a test")])
    assert audit.status == "queued" and not ran and not web._tasks  # deferred, not run here
    return audit, jobs.deferred[-1]


def stored_row(port: int, name: str) -> CheckResult:
    return CheckResult("proxy", "127.0.0.1", port, name, Verdict.OPEN, "token_returned", detail="kept from run 1")


def test_an_audit_request_round_trips_through_its_json_and_a_malformed_one_is_refused():
    request = AuditRequest(audit_id="x", requester_key="127.0.0.1", hosts={"relay": ["192.0.2.1"], "proxy": []},
                           services=("relay", "proxy"), addresses=("192.0.2.1",), audited_domain="example.org",
                           forbidden=(Forbidden("relay", "10.0.0.1", "private", "forbidden_address"),))
    assert AuditRequest.from_json(request.to_json()) == request
    for broken in ({}, {**request.to_json(), "hosts": 3}, {**request.to_json(), "forbidden": [[1]]},
                   {**request.to_json(), "listeners": [["h", "not a port"]]}):
        with pytest.raises(ValueError):
            AuditRequest.from_json(broken)


async def test_a_resumed_run_keeps_the_stored_rows_runs_only_the_rest_and_numbers_on(settings, store):
    jobs, ran = FakeJobs(), []
    audit, request = await queued_audit(settings, store, jobs, ran)
    # a first worker stored both rows of 20001, one of 20002, then died
    for seq, (port, name) in enumerate([(20001, "proxy.a"), (20001, "proxy.b"), (20002, "proxy.a")], start=1):
        await store.add_check(audit.id, seq, stored_row(port, name))
    worker = Auditor(settings, store, planners={"proxy": counting_planner(ran)}, jobs=jobs)
    assert await worker.run_job(AuditRequest.from_json(request.to_json())) == "done"
    done = await store.get_audit(audit.id)
    assert done.status == "done" and len(done.checks) == done.planned == 9  # 4 units x 2 rows, and the guard row
    assert sorted(ran) == [20002, 20003, 20004]  # 20001 was whole: not run again; 20002 missed a row: run again
    assert [c.seq for c in done.checks] == list(range(1, 10))
    keys = [(c.result.port, c.result.name) for c in done.checks]
    assert len(set(keys)) == len(keys)  # no row twice
    assert [c.result.detail for c in done.checks[:3]] == ["kept from run 1"] * 3  # the first run's rows stay
    assert done.summary == {"relay": None, "proxy": "open", "blocklist": None}  # the kept rows count in the summary
    assert done.owner == worker.instance_id  # the worker that finished it owns it


async def test_an_audit_whose_job_cannot_be_deferred_fails_at_once(settings, store):
    class Broken(FakeJobs):
        async def defer(self, request: AuditRequest) -> None:
            raise OSError("the queue's database is gone")

    auditor = Auditor(settings, store, jobs=Broken())
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"])
    stored = await store.get_audit(audit.id, with_checks=False)
    assert (audit.status, stored.status, stored.error) == ("failed", "failed", "internal error: OSError")


async def test_a_job_for_a_finished_audit_runs_nothing(settings, store):
    jobs, ran = FakeJobs(), []
    audit, request = await queued_audit(settings, store, jobs, ran)
    await store.finish_audit(audit.id, "interrupted", None, "gone")
    worker = Auditor(settings, store, planners={"proxy": counting_planner(ran)}, jobs=jobs)
    assert await worker.run_job(request) == "skipped"
    assert not ran and (await store.get_audit(audit.id)).owner != worker.instance_id


async def test_a_stopping_worker_leaves_its_audit_running_for_the_next_one_and_interrupts_nothing(settings, store):
    jobs, ran = FakeJobs(), []
    audit, request = await queued_audit(settings, store, jobs, ran)
    hold = asyncio.Event()
    worker = Auditor(settings, store, planners={"proxy": counting_planner(ran, hold)}, jobs=jobs)
    task = asyncio.create_task(worker.run_job(request))
    for _ in range(200):
        if len(ran) == len(PORTS):
            break
        await asyncio.sleep(0.01)
    task.cancel()  # procrastinate cancels a stopping worker's jobs after its grace time
    with pytest.raises(asyncio.CancelledError):
        await task
    await worker.shutdown()
    stored = await store.get_audit(audit.id)
    assert stored.status == "running" and stored.error is None  # the job goes back to the queue: not interrupted
    assert stored.owner == worker.instance_id  # until the next worker claims it


@pytest.mark.both_stores
async def test_a_worker_taken_for_dead_does_not_end_the_audit_another_worker_took_over(settings, store):
    jobs, ran = FakeJobs(), []
    audit, request = await queued_audit(settings, store, jobs, ran)
    hold = asyncio.Event()
    slow = Auditor(settings, store, planners={"proxy": counting_planner(ran, hold)}, jobs=jobs)
    first = asyncio.create_task(slow.run_job(request))
    for _ in range(200):  # every unit held, and the guard's row (not held) stored while the audit was still its
        if len(ran) == len(PORTS) and (await store.get_audit(audit.id)).checks:
            break
        await asyncio.sleep(0.01)
    assert await store.claim(audit.id, "the-next-worker")  # its job was put back and taken meanwhile
    rows_before = [(c.seq, c.result.name) for c in (await store.get_audit(audit.id)).checks]
    hold.set()
    assert await asyncio.wait_for(first, 10) == "taken_over"
    stored = await store.get_audit(audit.id)
    assert (stored.status, stored.owner) == ("running", "the-next-worker")  # not ended by the first worker
    # nor written to: its rows would take the seq numbers of the worker that resumed the audit
    assert [(c.seq, c.result.name) for c in stored.checks] == rows_before


async def test_with_the_queue_recovery_spares_what_the_queue_says_and_queue_position_asks_it(settings, store):
    jobs, ran = FakeJobs(), []
    audit, _ = await queued_audit(settings, store, jobs, ran)
    orphan, _ = await queued_audit(settings, store, jobs, ran)
    await store.beat("gone")
    await store.claim(audit.id, "gone")
    await store.claim(orphan.id, "gone")
    auditor = Auditor(settings.model_copy(update={"instance_stale_seconds": 0.001}), store, jobs=jobs)
    jobs.spared = f"id = '{audit.id}'"
    await asyncio.sleep(0.01)
    assert await auditor.recover() == 1
    assert [(await store.get_audit(a.id)).status for a in (audit, orphan)] == ["running", "interrupted"]
    assert await auditor.queue_position(orphan.id) == 2


# --- the queue's SQL, against the real PostgreSQL --------------------------------------------------------------

@pytest.fixture
def pg_settings(settings, postgres_server):
    return settings.model_copy(update={"database_url": postgres_server.new_database(), "max_running_audits": 2})


@pytest.fixture
async def pg_store(pg_settings):
    from app.store import Store

    store = Store(pg_settings.database_location)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def queue(pg_settings, pg_store):
    from app.jobs import AuditQueue

    queue = AuditQueue(pg_settings, pg_store)
    await queue.open()
    yield queue
    await queue.close()


def request_for(audit_id: str, requester: str, address: str = "192.0.2.1") -> AuditRequest:
    return AuditRequest(audit_id=audit_id, requester_key=requester, hosts={"relay": [address]}, services=("relay",),
                        addresses=(address,))


async def test_the_schema_is_applied_once_when_processes_start_together(pg_settings):
    from app.jobs import ensure_schema

    applied = await asyncio.gather(*(ensure_schema(pg_settings.database_url) for _ in range(4)))
    assert sorted(applied) == [False, False, False, True]
    assert await ensure_schema(pg_settings.database_url) is False


async def test_requesters_take_turns_in_the_queue_and_the_position_says_so(queue):
    for audit_id, requester, address in [("a1", "A", "192.0.2.1"), ("a2", "A", "192.0.2.2"),
                                         ("a3", "A", "192.0.2.3"), ("b1", "B", "192.0.2.9")]:
        await queue.defer(request_for(audit_id, requester, address))
    assert [await queue.position(a) for a in ("a1", "b1", "a2", "a3")] == [1, 2, 3, 4]
    assert await queue.position("nope") is None
    worker_id = await queue.app.job_manager.register_worker()
    fetched = [(await queue.app.job_manager.fetch_job(["audits"], worker_id)) for _ in range(4)]
    assert [job.task_kwargs["audit_id"] for job in fetched] == ["a1", "b1", "a2", "a3"]


async def test_the_queue_replaces_connections_a_database_restart_ended(queue, pg_settings, postgres_server):
    """Every session of the queue's pool ended under it (a restart, a failover): deferring and asking a position go
    on with fresh connections instead of failing a request for each dead one the pool hands out."""
    await queue.defer(request_for("before", "A"))
    assert postgres_server.end_sessions(pg_settings.database_url) >= 1
    for n in range(6):  # more calls than the pool holds (4)
        await queue.defer(request_for(f"after{n}", "B", f"192.0.2.{10 + n}"))
    assert [await queue.position(a) for a in ("before", "after5")] == [1, 7]


async def test_a_worker_takes_running_slots_again_after_its_lock_session_was_ended(queue, pg_settings,
                                                                                  postgres_server):
    """The session holding a worker's running slots ended (a restart: its locks went with it): the next slot is
    taken on a new session instead of failing the job that asked for it."""
    async with queue.slot() as first:
        assert postgres_server.end_sessions(pg_settings.database_url) >= 1
        async with queue.slot() as second:
            assert {first, second} == {0, 1}
    async with queue.slot():
        assert postgres_server.end_sessions(pg_settings.database_url) >= 1
    # ...and a slot whose session ended before it was given back leaves without an error
    async with queue.slot() as again:
        assert again == 0


async def test_one_address_is_not_audited_by_two_workers_at_once(queue):
    await queue.defer(request_for("first", "A"))
    await queue.defer(request_for("second", "B"))  # the same address: waits for the first
    manager = queue.app.job_manager
    worker_id = await manager.register_worker()
    job = await manager.fetch_job(["audits"], worker_id)
    assert job.task_kwargs["audit_id"] == "first"
    assert await manager.fetch_job(["audits"], worker_id) is None
    from procrastinate.jobs import Status

    await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
    assert (await manager.fetch_job(["audits"], worker_id)).task_kwargs["audit_id"] == "second"


async def test_the_running_slots_are_counted_across_workers_and_freed_when_a_worker_goes(pg_settings, queue):
    from app.jobs import AuditQueue

    other = AuditQueue(pg_settings, queue.store)  # a second worker
    await other.open()
    try:
        async with queue.slot(), queue.slot():  # the site's two slots, on this worker
            waiting = asyncio.create_task(other.slot().__aenter__())
            await asyncio.sleep(1.5)  # three tries of the other worker
            assert not waiting.done()
            await queue.close()  # this worker's connection goes (a worker killed): its slots with it
            await asyncio.wait_for(waiting, 10)
            assert await other._try_lock(1000) or await other._try_lock(1001)
    finally:
        await other.close()


async def test_the_jobs_of_one_worker_never_share_a_slot(queue):
    """One worker's connection holds all its slots, and a session may take a lock it holds again: four jobs of
    one worker trying at once get the two slots, one each; the other two wait for them."""
    entered: list[int] = []
    release = asyncio.Event()

    async def job() -> None:
        async with queue.slot() as slot:
            entered.append(slot)
            await release.wait()

    jobs = [asyncio.create_task(job()) for _ in range(4)]
    await asyncio.sleep(1.5)  # three tries of the waiting jobs
    assert sorted(entered) == [0, 1]
    release.set()
    await asyncio.wait_for(asyncio.gather(*jobs), 10)
    assert len(entered) == 4 and set(entered) == {0, 1}  # the waiting two ran then


async def test_a_dead_workers_job_is_put_back_once_and_a_live_workers_is_not(queue):
    manager = queue.app.job_manager
    for audit_id, address in [("dead", "192.0.2.1"), ("live", "192.0.2.2")]:
        await queue.defer(request_for(audit_id, audit_id, address))
    dead, live = await manager.register_worker(), await manager.register_worker()
    assert (await manager.fetch_job(["audits"], dead)).task_kwargs["audit_id"] in ("dead", "live")
    await manager.fetch_job(["audits"], live)
    await queue.app.connector.execute_query_async(
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = %(id)s", id=dead)
    assert await queue.retry_stalled() == 1
    assert await queue.retry_stalled() == 0  # put back once
    rows = await queue.app.connector.execute_query_all_async(
        "SELECT status, attempts, worker_id FROM procrastinate_jobs ORDER BY id")
    assert sorted((r["status"], r["attempts"]) for r in rows) == [("doing", 0), ("todo", 1)]


def stored_audit(audit_id: str, owner: str) -> Audit:
    return Audit(id=audit_id, created_at=time.time(), status="running", target="self", requester="192.0.2.7",
                 hosts=["192.0.2.7"], services=["relay"], planned=1, engine_version="test", owner=owner)


async def test_recovery_spares_an_audit_whose_job_can_still_run(queue, pg_store):
    """Only an audit whose owner is gone AND whose job will never run again is interrupted."""
    from procrastinate.jobs import Status

    await pg_store.beat("alive")
    for audit_id, owner in [("queued_job", "gone"), ("stalled_job", "gone"), ("no_job", "gone"),
                            ("live_owner", "alive"), ("failed_job", "gone")]:
        await pg_store.create_audit(stored_audit(audit_id, owner))
    manager = queue.app.job_manager
    for n, audit_id in enumerate(["stalled_job", "failed_job", "queued_job"]):
        await queue.defer(request_for(audit_id, audit_id, f"192.0.2.{n}"))
    worker = await manager.register_worker()
    await manager.fetch_job(["audits"], worker)  # stalled_job: doing, its worker about to vanish
    failed = await manager.fetch_job(["audits"], worker)
    await manager.finish_job(failed, status=Status.FAILED, delete_job=False)
    await manager.unregister_worker(worker)
    assert await pg_store.interrupt_orphaned(30.0, queue.spared) == 2
    statuses = {a: (await pg_store.get_audit(a, with_checks=False)).status
                for a in ("failed_job", "live_owner", "no_job", "queued_job", "stalled_job")}
    assert statuses == {"failed_job": "interrupted", "live_owner": "running", "no_job": "interrupted",
                        "queued_job": "running", "stalled_job": "running"}
    assert await pg_store.claim("stalled_job", "me") and not await pg_store.claim("no_job", "me")
    assert (await pg_store.get_audit("stalled_job", with_checks=False)).owner == "me"


async def test_a_job_whose_workers_died_every_time_fails_its_audit_instead_of_running_again(queue, pg_store):
    from app.jobs import MAX_RUNS

    await pg_store.create_audit(stored_audit("poison", "gone"))
    await pg_store.create_audit(stored_audit("fine", "gone"))
    await queue.defer(request_for("poison", "A", "192.0.2.1"))
    await queue.defer(request_for("fine", "B", "192.0.2.2"))
    await queue.app.connector.execute_query_async(
        "UPDATE procrastinate_jobs SET attempts = %(n)s WHERE args->>'audit_id' = 'poison'", n=MAX_RUNS)
    ran: list[str] = []

    async def run(request: AuditRequest) -> str:
        ran.append(request.audit_id)
        return "done"

    queue.register(run)
    worker = asyncio.create_task(queue.work(2, "test-worker", signals=False))
    try:
        for _ in range(200):
            if ran and (await pg_store.get_audit("poison", with_checks=False)).finished:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    poison = await pg_store.get_audit("poison", with_checks=False)
    assert ran == ["fine"]
    assert (poison.status, poison.error) == ("failed", f"interrupted: its worker stopped {MAX_RUNS} times")


def test_a_worker_refuses_to_start_on_sqlite(settings, capsys):
    from app.cli import main

    assert settings.database_url.startswith("sqlite:///")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SECURE_DATABASE_URL", settings.database_url)
        assert main(["worker"]) == 2
    assert "SECURE_DATABASE_URL=postgresql://" in capsys.readouterr().err


def test_a_worker_refuses_to_start_with_a_bad_blocklists_file(settings, tmp_path, capsys):
    """The worker runs the blocklist checks: a broken SECURE_BLOCKLISTS_FILE stops it at start, as it stops serve."""
    from app.cli import main
    from app.config import get_settings

    bad = tmp_path / "lists.toml"
    bad.write_text('[[list]]\nid = "x"\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SECURE_DATABASE_URL", settings.database_url)
        patch.setenv("SECURE_BLOCKLISTS_FILE", str(bad))
        get_settings.cache_clear()  # the CLI reads the environment once per process
        try:
            assert main(["worker"]) == 2
        finally:
            get_settings.cache_clear()
    err = capsys.readouterr().err
    assert str(bad) in err and "SECURE_DATABASE_URL" not in err
