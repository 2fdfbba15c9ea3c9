import asyncio

import pytest

from app.access.targets import Listener
from app.audits import Auditor
from app.probes import PlannedCheck, ProbeOptions
from app.verdicts import CheckResult, Verdict

pytestmark = pytest.mark.both_stores  # the API on SQLite and on PostgreSQL (tests/conftest.py)


def fake_planner(behaviour, tracker=None):
    """A planner whose checks sleep, crash or answer as told, and record how many run at once per host."""
    def plan(host, ports, options: ProbeOptions):
        checks = []
        for port in ports:
            async def run(emit, slot, port=port):
                async with slot():
                    if tracker is not None:
                        tracker["now"] += 1
                        tracker["max"] = max(tracker["max"], tracker["now"])
                    try:
                        action = behaviour(port)
                        if action == "crash":
                            raise RuntimeError("boom")
                        if action == "silent":
                            return  # ends without the row it promised
                        if isinstance(action, float):
                            await asyncio.sleep(action)
                        if isinstance(action, asyncio.Event):
                            await action.wait()  # held until the test lets it finish
                        result = CheckResult("proxy", host, port, "proxy.fake", Verdict.CLOSED, "destination_denied")
                    finally:
                        if tracker is not None:
                            tracker["now"] -= 1
                await emit(result)
            checks.append(PlannedCheck("proxy", host, port, ("proxy.fake",), run))
        return checks
    return plan


async def run_audit(auditor, services=("proxy",), hosts=("127.0.0.1",)):
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=list(hosts), services=list(services))
    task = auditor._tasks.get(audit.id)
    if task:
        await asyncio.wait_for(asyncio.shield(task), 30)
    return await auditor.store.get_audit(audit.id)


async def test_per_host_connection_limit_is_respected(settings, store):
    settings.proxy_ports = list(range(20000, 20012))
    settings.max_connections_per_host = 3
    tracker = {"now": 0, "max": 0}
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 0.05, tracker)})
    audit = await run_audit(auditor)
    assert audit.status == "done" and len(audit.checks) == 12
    assert tracker["max"] == 3  # concurrent, but never more than the limit


async def test_deadline_gives_every_unfinished_check_its_own_row(settings, store):
    settings.proxy_ports = [20001, 20002, 20003]
    settings.audit_deadline = 0.3
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 0.0 if p == 20001 else 30.0)})
    audit = await run_audit(auditor)
    assert audit.status == "done"
    by_port = {c.result.port: c.result for c in audit.checks}
    assert by_port[20001].reason == "destination_denied"
    assert by_port[20002].reason == by_port[20003].reason == "audit_deadline"
    assert by_port[20002].verdict is Verdict.INCONCLUSIVE
    assert audit.summary["proxy"] == "inconclusive"


async def test_a_crashing_check_becomes_an_error_row_not_a_lost_one(settings, store):
    settings.proxy_ports = [20001, 20002]
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: "crash" if p == 20002 else 0.0)})
    audit = await run_audit(auditor)
    by_port = {c.result.port: c.result for c in audit.checks}
    assert (by_port[20002].verdict, by_port[20002].reason) == (Verdict.ERROR, "internal_error")
    assert audit.summary == {"relay": None, "proxy": "inconclusive", "blocklist": None}


async def test_a_unit_that_forgets_its_row_gets_an_error_row(settings, store):
    settings.proxy_ports = [20001]
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: "silent")})
    audit = await run_audit(auditor)
    assert [(c.result.verdict, c.result.reason) for c in audit.checks] == [(Verdict.ERROR, "internal_error")]


async def test_own_listeners_are_never_planned(settings, store):
    settings.proxy_ports = [8000, 8080]
    settings.relay_ports = [25]
    auditor = Auditor(settings, store, listeners=[Listener("127.0.0.1", 8000), Listener("0.0.0.0", 25)])
    planned = auditor.plan(["127.0.0.1"], ["relay", "proxy"])
    assert [(c.service, c.port) for c in planned] == [("proxy", 8080)]
    # another address is not the site's own listener
    planned = auditor.plan(["192.0.2.1"], ["proxy"])
    assert [c.port for c in planned] == [8000, 8080]



async def test_own_listeners_are_never_planned_in_any_form(settings, store):
    """Issue 10: the sink on 127.0.0.1 was tested through ::ffff:127.0.0.1 and reported open, confirmed."""
    settings.relay_ports = [25, 2525, 587]
    settings.proxy_ports = [443, 8080]
    listeners = [Listener("127.0.0.1", 2525), Listener("0.0.0.0", 25), Listener("::", 443)]
    auditor = Auditor(settings, store, listeners=listeners)
    for host in ("::ffff:127.0.0.1", "::ffff:7f00:1", "127.0.0.1"):
        planned = auditor.plan([host], ["relay", "proxy"])
        assert [(c.service, c.port) for c in planned] == [("relay", 587), ("proxy", 8080)], host
        assert {c.host for c in planned} == {host}


async def test_the_sites_public_and_canary_addresses_are_own(settings, store):
    public, canary, elsewhere = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"
    settings.public_addresses = [public]
    settings.canary_address = canary
    settings.relay_ports = [25, 587]
    settings.proxy_ports = [443, 8080]
    auditor = Auditor(settings, store, listeners=[Listener("0.0.0.0", 25), Listener("::", 443)])
    for host in (public, f"::ffff:{public}", f"64:ff9b::{public}", canary):
        planned = auditor.plan([host], ["relay", "proxy"])
        assert [(c.service, c.port) for c in planned] == [("relay", 587), ("proxy", 8080)], host
    planned = auditor.plan([elsewhere], ["relay", "proxy"])
    assert [(c.service, c.port) for c in planned] == [("relay", 25), ("relay", 587), ("proxy", 443),
                                                      ("proxy", 8080)]
    # what start_listeners found (the machine's addresses) counts too
    auditor = Auditor(settings, store, listeners=[Listener("0.0.0.0", 25)], own_addresses=[elsewhere])
    assert [c.port for c in auditor.plan([elsewhere], ["relay"])] == [587]


def test_site_addresses_from_the_settings(settings):
    from app.listeners import site_addresses

    settings.public_addresses = ["93.184.216.34", "2001:db8::5"]
    settings.canary_address = "192.0.2.7"
    settings.public_url = "http://[2001:db8::9]:8000"
    settings.ipv4_url = "https://v4.example.org"
    assert [str(a) for a in site_addresses(settings, ("fe80::1%eth0", "93.184.216.34"))] == [
        "93.184.216.34", "2001:db8::5", "192.0.2.7", "2001:db8::9", "fe80::1"]


async def test_real_reachability_audit_end_to_end(settings, store, open_port, refused_port):
    auditor = Auditor(settings, store)
    audit = await run_audit(auditor, services=("relay", "proxy"))
    rows = {(c.result.service, c.result.port, c.result.name): (c.result.verdict, c.result.reason)
            for c in audit.checks}
    assert rows[("proxy", open_port, "proxy.reachable")] == (Verdict.INCONCLUSIVE, "port_open")
    relay = [v for (service, _, _), v in rows.items() if service == "relay"]
    assert relay == [(Verdict.UNREACHABLE, "refused")] * 22  # every variant gets its own row
    assert audit.summary == {"relay": "unreachable", "proxy": "inconclusive", "blocklist": None}
    assert [c.seq for c in audit.checks] == list(range(1, 24))


async def test_follow_replays_stored_checks_then_live_ones_then_done(settings, store):
    """Deterministic: port 20001's check lands at once, the other two are held until the test releases them. The
    first event comes while they are held, so it can only be the replay of the stored check; the next two can only
    be live. A follower that arrives after the end gets everything replayed from the store, then done."""
    settings.proxy_ports = [20001, 20002, 20003]
    gate = asyncio.Event()

    def behaviour(port):
        return 0.0 if port == 20001 else gate
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(behaviour)})
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"])
    async with asyncio.timeout(5):  # bounded: the first check is stored before anyone follows
        while len((await store.get_audit(audit.id)).checks) < 1:
            await asyncio.sleep(0.01)
    assert (await store.get_audit(audit.id)).status == "running"
    follower = auditor.follow(audit.id, keepalive=5)
    replayed = await asyncio.wait_for(anext(follower), 5)
    assert (replayed.kind, replayed.seq, replayed.data.port) == ("check", 1, 20001)  # from the store
    gate.set()
    live = []
    async with asyncio.timeout(10):
        async for event in follower:
            live.append(event)
            if event.kind == "done":
                break
    assert [(e.kind, e.data.port) for e in live[:2]] in ([("check", 20002), ("check", 20003)],
                                                          [("check", 20003), ("check", 20002)])
    assert sorted(e.seq for e in live[:2]) == [2, 3]
    assert (live[-1].kind, live[-1].data["status"]) == ("done", "done") and len(live) == 3

    late = []
    async with asyncio.timeout(5):
        async for event in auditor.follow(audit.id, keepalive=5):
            late.append(event)
            if event.kind == "done":
                break
    assert [(e.kind, e.seq) for e in late] == [("check", 1), ("check", 2), ("check", 3), ("done", -1)]
    assert {e.seq: e.data.port for e in late[:3]} == {1: 20001, **{e.seq: e.data.port for e in live[:2]}}


async def test_follow_of_another_processs_audit_is_woken_by_its_writes(settings, store, store_location):
    """Two Auditors on two Stores of one database, as two processes: B follows an audit A runs. B watches the store
    only for it (never for its own audits), each of A's rows reaches B's follower within a second of being stored
    (without the wake-up B would wait for its 5 s keep-alive), and the watch ends with the follow."""
    from app.store import Store

    settings.proxy_ports = [20001, 20002]
    gates = {20001: asyncio.Event(), 20002: asyncio.Event()}
    other = Store(store_location)
    await other.open()
    try:
        a = Auditor(settings, other, planners={"proxy": fake_planner(lambda port: gates[port])})
        b = Auditor(settings, store, planners={"proxy": fake_planner(lambda port: 0.0)})
        own = await run_audit(b)
        async with asyncio.timeout(5):
            assert [e.kind async for e in b.follow(own.id, keepalive=5)] == ["check", "check", "done"]
        assert not store._watched  # its own audit: nothing to watch
        audit = await a.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"])
        follower = b.follow(audit.id, keepalive=5)
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.3)
        assert not pending.done() and list(store._watched) == [audit.id]
        seen = []
        for port in (20001, 20002):
            gates[port].set()
            async with asyncio.timeout(1.0):
                event = await pending
            seen.append((event.kind, event.data.port))
            pending = asyncio.ensure_future(anext(follower))
        async with asyncio.timeout(1.0):
            event = await pending
        seen.append((event.kind, event.data["status"]))
        await follower.aclose()
        assert seen == [("check", 20001), ("check", 20002), ("done", "done")]
        assert not store._watched
    finally:
        await other.close()


async def test_shutdown_marks_running_audits_interrupted(settings, store):
    settings.proxy_ports = [20001]
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 30.0)})
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"])
    await asyncio.sleep(0.1)
    await auditor.shutdown()
    assert (await store.get_audit(audit.id)).status == "interrupted"


def scripted_planner(script, names=("proxy.a", "proxy.b")):
    """A planner of one unit per port that promises `names` and runs `script(emit, row, slot)`; `row(name)` makes
    a closed row of this unit."""
    def plan(host, ports, options: ProbeOptions):
        def unit(port):
            def row(name):
                return CheckResult("proxy", host, port, name, Verdict.CLOSED, "destination_denied")

            async def run(emit, slot):
                await script(emit, row, slot)
            return PlannedCheck("proxy", host, port, names, run)
        return [unit(port) for port in ports]
    return plan


def rows_of(audit):
    return [(c.seq, c.result.name, c.result.verdict, c.result.reason, c.result.detail) for c in audit.checks]


async def test_a_repeated_or_unpromised_row_is_dropped(settings, store):
    settings.proxy_ports = [20001]

    async def script(emit, row, slot):
        for name in ("proxy.a", "proxy.a", "proxy.other", "proxy.b"):
            await emit(row(name))
    audit = await run_audit(Auditor(settings, store, planners={"proxy": scripted_planner(script)}))
    assert rows_of(audit) == [(1, "proxy.a", Verdict.CLOSED, "destination_denied", ""),
                              (2, "proxy.b", Verdict.CLOSED, "destination_denied", "")]


async def test_a_crash_keeps_the_rows_already_emitted_and_names_the_error(settings, store):
    settings.proxy_ports = [20001]

    async def script(emit, row, slot):
        await emit(row("proxy.a"))
        raise KeyError("boom")
    audit = await run_audit(Auditor(settings, store, planners={"proxy": scripted_planner(script)}))
    assert rows_of(audit) == [(1, "proxy.a", Verdict.CLOSED, "destination_denied", ""),
                              (2, "proxy.b", Verdict.ERROR, "internal_error", "the check crashed: KeyError")]


async def test_a_unit_that_returns_early_gets_error_rows_for_the_rest_only(settings, store):
    settings.proxy_ports = [20001]

    async def script(emit, row, slot):
        await emit(row("proxy.b"))
    audit = await run_audit(Auditor(settings, store, planners={"proxy": scripted_planner(script)}))
    assert rows_of(audit) == [(1, "proxy.b", Verdict.CLOSED, "destination_denied", ""),
                              (2, "proxy.a", Verdict.ERROR, "internal_error", "the check ended without a result")]


async def test_the_deadline_keeps_the_rows_already_emitted_and_says_how_long_it_waited(settings, store):
    settings.proxy_ports = [20001]
    settings.audit_deadline = 1.0  # said as "1 s"

    async def script(emit, row, slot):
        await emit(row("proxy.a"))
        await asyncio.sleep(30)
    audit = await run_audit(Auditor(settings, store, planners={"proxy": scripted_planner(script)}))
    assert rows_of(audit) == [(1, "proxy.a", Verdict.CLOSED, "destination_denied", ""),
                              (2, "proxy.b", Verdict.INCONCLUSIVE, "audit_deadline", "not finished after 1 s")]


async def test_every_form_of_one_address_shares_its_connection_slots(settings, store):
    """::ffff:127.0.0.1 is 127.0.0.1: the per-host limit counts both forms together."""
    settings.proxy_ports = list(range(20001, 20005))
    settings.max_connections_per_host = 2
    tracker = {"now": 0, "max": 0}
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 0.05, tracker)})
    audit = await run_audit(auditor, hosts=("127.0.0.1", "::ffff:127.0.0.1"))
    assert len(audit.checks) == 8 and [c.seq for c in audit.checks] == list(range(1, 9))
    assert tracker["max"] == 2


async def test_follow_of_an_unknown_audit_ends_at_once(settings, store):
    auditor = Auditor(settings, store)
    async with asyncio.timeout(5):
        assert [event async for event in auditor.follow("A" * 22, keepalive=5)] == []
    assert auditor.events._followers == {}


async def test_follow_sends_keepalives_while_nothing_happens_and_no_row_twice(settings, store):
    """While the held check runs, the follower gets keep-alives (None); each one is followed by a new read of the
    store, which must not send the already sent row again. Closing the follower unsubscribes it."""
    settings.proxy_ports = [20001, 20002]
    gate = asyncio.Event()
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 0.0 if p == 20001 else gate)})
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["proxy"])
    async with asyncio.timeout(5):
        while len((await store.get_audit(audit.id)).checks) < 1:
            await asyncio.sleep(0.01)
    follower = auditor.follow(audit.id, keepalive=0.05)
    seen = []
    async with asyncio.timeout(10):
        async for event in follower:
            seen.append(event)
            if seen.count(None) == 3:
                gate.set()
            if event is not None and event.kind == "done":
                break
    assert (seen[0].kind, seen[0].seq) == ("check", 1)
    assert seen[1:4] == [None, None, None]
    sent = [(e.kind, e.seq) for e in seen if e is not None]
    assert sent == [("check", 1), ("check", 2), ("done", -1)]
    await follower.aclose()
    assert auditor.events._followers == {}


async def test_a_row_being_stored_when_the_deadline_strikes_is_kept_once(settings, store, monkeypatch):
    """The deadline cancels a unit while its row is on the way to the store: the row is neither lost (a name
    marked as emitted but never stored) nor stored twice (its own row and a deadline row)."""
    settings.proxy_ports = [20001]
    settings.audit_deadline = 0.3
    real_add = store.add_check

    async def slow_add(*args, **kwargs):
        await asyncio.sleep(0.6)  # the deadline strikes in the middle of this write
        await real_add(*args, **kwargs)

    monkeypatch.setattr(store, "add_check", slow_add)
    auditor = Auditor(settings, store, planners={"proxy": fake_planner(lambda p: 0.0)})
    audit = await run_audit(auditor)
    rows = [(c.result.name, c.result.verdict, c.result.reason) for c in audit.checks]
    assert rows == [("proxy.fake", Verdict.CLOSED, "destination_denied")]
    assert audit.summary["proxy"] == "closed"
