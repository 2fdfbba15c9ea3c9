"""Admission (app/admission.py), pinned exactly: every decision's outcome, code, wait, limit and audit.

Written against the mutants that survived `make mutation`: the existing rule tests checked the codes, not the
whole decision the pages and the API show (how long to wait, which limit, which audit).
"""

from __future__ import annotations

import pytest

from app.admission import HOUR, Decision, Facts, Limits, _wait, covers, decide
from app.config import Settings
from app.store import Audit

LIMITS = Limits(cooldown=60, audits_per_target_per_hour=6, max_running_per_requester=2, audits_per_hour=20,
                max_queued=200)


def audit(target: str = "self", hosts: tuple[str, ...] = ("192.0.2.1",), services: tuple[str, ...] = ("relay",),
          created_at: float = 1000.0) -> Audit:
    return Audit(id="A" * 22, created_at=created_at, status="done", target=target, requester="192.0.2.1",
                 hosts=list(hosts), services=list(services), planned=1, engine_version="x")


def facts(**values) -> Facts:
    base = dict(now=1030.0, latest=None, target_hour=[], requester_running=0, requester_hour=0,
                requester_oldest=None, queued=0)
    base.update(values)
    return Facts(**base)


def judge(f: Facts, limits: Limits = LIMITS, retest: bool = False, services: tuple[str, ...] = ("relay",)) -> Decision:
    return decide(f, limits, target="self", hosts=("192.0.2.1",), services=services, retest=retest)


def test_the_cached_audit_is_the_one_served():
    latest = audit()
    assert judge(facts(latest=latest)) == Decision("cached", latest=latest)


def test_a_cooldown_refusal_names_the_audit_the_wait_and_the_cooldown():
    latest = audit()
    assert judge(facts(latest=latest), retest=True) == Decision("refused", "cooldown", 30, latest=latest, limit=60)


@pytest.mark.parametrize("cooldown,expected", [(0, "create"), (1, "refused"), (0.5, "refused")])
def test_a_cooldown_of_zero_is_off_and_any_other_is_on(cooldown, expected):
    limits = Limits(cooldown=cooldown, audits_per_target_per_hour=6, max_running_per_requester=2,
                    audits_per_hour=20, max_queued=200)
    latest = audit(created_at=1029.9)
    assert judge(facts(latest=latest), limits, retest=True).outcome == expected


def test_the_same_services_are_covered_not_only_fewer():
    latest = audit(services=("relay", "proxy"))
    assert covers(latest, "self", ["192.0.2.1"], ["relay", "proxy"])
    assert covers(latest, "self", ["192.0.2.1"], ["relay"])
    assert not covers(latest, "self", ["192.0.2.1"], ["relay", "proxy", "other"])
    assert judge(facts(latest=latest), services=("relay", "proxy")).outcome == "cached"


def test_every_refusal_is_exactly_what_the_pages_show():
    assert judge(facts(target_hour=[("192.0.2.9", 1, 900.0), ("192.0.2.1", 6, 500.0)])) == Decision(
        "refused", "target_hourly", 3070, address="192.0.2.1", limit=6)
    assert judge(facts(requester_running=2)) == Decision("refused", "requester_running", 30, limit=2)
    assert judge(facts(requester_hour=20, requester_oldest=100.0)) == Decision(
        "refused", "requester_hourly", 2670, limit=20)
    # no oldest audit known: wait a whole hour from now
    assert judge(facts(requester_hour=20)) == Decision("refused", "requester_hourly", int(HOUR), limit=20)
    assert judge(facts(queued=200)) == Decision("refused", "busy", 60, limit=200)
    assert judge(facts()) == Decision("create")


@pytest.mark.parametrize("until,now,expected", [(1000.0, 1000.0, 1), (900.0, 1000.0, 1), (1001.2, 1000.0, 2),
                                                (1030.0, 1000.0, 30)])
def test_the_wait_is_whole_seconds_and_at_least_one(until, now, expected):
    assert _wait(until, now) == expected


def test_limits_come_from_the_settings(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", target_cooldown=61,
                        audits_per_target_per_hour=7, max_running_per_requester=3, audits_per_hour=21,
                        max_queued_audits=201)
    assert Limits.from_settings(settings) == Limits(cooldown=61, audits_per_target_per_hour=7,
                                                    max_running_per_requester=3, audits_per_hour=21, max_queued=201)
