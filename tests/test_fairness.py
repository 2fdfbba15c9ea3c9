"""The fair queue and the site-wide per-address connection slots (app/fairness.py), and the admission rules."""

from __future__ import annotations

import asyncio

from app.admission import Facts, Limits, decide
from app.fairness import AddressSlots, FairQueue, Job
from app.store import Audit


def queue_with(capacity: int, jobs: list[tuple[str, str, set[str]]]) -> tuple[FairQueue, list[str]]:
    started: list[str] = []
    queue = FairQueue(capacity)
    for audit_id, requester, addresses in jobs:
        queue.add(Job(audit_id, requester, frozenset(addresses), lambda a=audit_id: started.append(a)))
    return queue, started


def test_requesters_take_turns():
    queue, started = queue_with(1, [(f"a{n}", "A", {f"10.0.0.{n}"}) for n in range(5)] + [("b0", "B", {"10.0.1.1"})])
    assert started == ["a0"]
    assert queue.position("b0") <= 2 and queue.position("a4") == 5
    for _ in range(5):
        queue.finished(started[-1])
    assert started.index("b0") <= 2, started
    assert sorted(started) == sorted(["a0", "a1", "a2", "a3", "a4", "b0"])


def test_an_address_under_test_is_never_audited_twice_at_once():
    queue, started = queue_with(5, [("x1", "A", {"192.0.2.1"}), ("x2", "B", {"192.0.2.1", "192.0.2.2"}),
                                    ("y1", "C", {"192.0.2.3"})])
    assert started == ["x1", "y1"]  # x2 shares 192.0.2.1 with the running x1: it waits, y1 goes ahead
    queue.finished("x1")
    assert started == ["x1", "y1", "x2"]
    assert queue.running == 2 and queue.waiting == 0


async def test_address_slots_are_shared_by_every_holder():
    slots = AddressSlots(3)
    now = most = 0

    async def connection() -> None:
        nonlocal now, most
        async with slots.hold("192.0.2.1"):
            now += 1
            most = max(most, now)
            await asyncio.sleep(0.01)
            now -= 1

    # two "audits" of 10 connections each, at once
    await asyncio.gather(*(connection() for _ in range(20)))
    assert most == 3 and len(slots) == 0  # bounded, and nothing kept once nobody holds the address


def audit(target: str = "self", hosts: list[str] | None = None, services: list[str] | None = None,
          created_at: float = 1000.0) -> Audit:
    return Audit(id="A" * 22, created_at=created_at, status="done", target=target, requester="192.0.2.1",
                 hosts=hosts or ["192.0.2.1"], services=services or ["relay", "proxy"], planned=1,
                 engine_version="x")


LIMITS = Limits(cooldown=60, audits_per_target_per_hour=6, max_running_per_requester=2, audits_per_hour=20,
                max_queued=200)


def facts(**values) -> Facts:
    base = dict(now=1030.0, latest=None, target_hour=[], requester_running=0, requester_hour=0,
                requester_oldest=None, queued=0)
    base.update(values)
    return Facts(**base)


def judge(f: Facts, target: str = "self", hosts: tuple[str, ...] = ("192.0.2.1",),
          services: tuple[str, ...] = ("relay",), retest: bool = False):
    return decide(f, LIMITS, target=target, hosts=hosts, services=services, retest=retest)


def test_admission_rules():
    assert judge(facts()).outcome == "create"
    cached = judge(facts(latest=audit()))
    assert cached.outcome == "cached"
    # another target of the same address, more services, or a re-test: refused until the cooldown ends
    for decision in (judge(facts(latest=audit(target="corp.test"))), judge(facts(latest=audit(services=["proxy"]))),
                     judge(facts(latest=audit()), retest=True),
                     judge(facts(latest=audit(hosts=["192.0.2.9"])), hosts=("192.0.2.1", "192.0.2.2"))):
        assert (decision.outcome, decision.code, decision.retry_after) == ("refused", "cooldown", 30)
    spent = judge(facts(target_hour=[("192.0.2.1", 6, 500.0)]))
    assert (spent.code, spent.address, spent.retry_after) == ("target_hourly", "192.0.2.1", 3070)
    assert judge(facts(target_hour=[("192.0.2.1", 5, 500.0)])).outcome == "create"
    assert judge(facts(requester_running=2)).code == "requester_running"
    assert judge(facts(requester_running=1)).outcome == "create"
    hourly = judge(facts(requester_hour=20, requester_oldest=100.0))
    assert (hourly.code, hourly.retry_after) == ("requester_hourly", 2670)
    assert judge(facts(queued=200)).code == "busy" and judge(facts(queued=199)).outcome == "create"
