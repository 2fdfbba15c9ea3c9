"""The shape every probe shares: one mapping of connection failures, options built once from the settings."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from support import Slots, canaries, proxy_port, relay_port

from app.config import Settings
from app.probes import PLANNERS, ProbeOptions, reachability
from app.probes.base import connect_failure
from app.probes.canary import Canary
from app.probes.proxy import CanaryTargets
from app.verdicts import Verdict


@pytest.mark.parametrize("exc,expected", [
    (TimeoutError(), (Verdict.UNREACHABLE, "filtered", "no answer within 1.5 s")),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), (Verdict.UNREACHABLE, "refused",
                                                                        "connection refused")),
    (OSError(errno.ECONNRESET, "Connection reset by peer"), (Verdict.UNREACHABLE, "refused", "connection refused")),
    (OSError(errno.EHOSTUNREACH, "No route to host"), (Verdict.UNREACHABLE, "filtered", "no route: No route to host")),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), (Verdict.UNREACHABLE, "filtered",
                                                            "no route: Network is unreachable")),
    (OSError(errno.EACCES, "Permission denied"), (Verdict.UNREACHABLE, "filtered", "no route: Permission denied")),
    # our own machine cannot make the connection (no such local address): not the port's doing
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
     (Verdict.ERROR, "internal_error", "could not connect: Cannot assign requested address")),
])
def test_connection_failures_map_to_one_verdict(exc, expected):
    finding = connect_failure(exc, 1.5)
    assert (finding.verdict, finding.reason, finding.note) == expected


async def test_every_probe_says_the_same_about_a_refused_and_a_silent_port(refused_port, silent_port):
    """Relay, proxy and reachability rows agree, because they share the mapping."""
    async with canaries() as targets:
        for port, timeout, expected in ((refused_port, 2.0, ("unreachable", "refused")),
                                        (silent_port, 0.3, ("unreachable", "filtered"))):
            relay = await relay_port(port, connect_timeout=timeout)
            proxy = await proxy_port(port, targets, connect_timeout=timeout)
            reach = await reachability.check("proxy", "127.0.0.1", port, timeout)
            rows = [*relay.values(), *proxy.values(), reach]
            assert {(r.verdict.value, r.reason) for r in rows} == {expected}
            assert len({r.detail for r in rows}) == 1  # the same words too


def test_probe_options_are_built_once_from_the_settings(tmp_path: Path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", public_url="https://site.test",
                        probe_domain="sink.example.net", probe_helo="helo.example.net", connect_timeout=1.25,
                        smtp_command_timeout=2.5, smtp_port_deadline=33.0, greylist_max_wait=7.0,
                        proxy_step_timeout=4.5)
    targets = CanaryTargets(canary=Canary("secret"), address="192.0.2.10", smtp_port=2525)
    options = ProbeOptions.for_audit(settings, "AUDIT1", "example.org", canary=targets)
    relay = options.relay
    assert (relay.audit_id, relay.site_url, relay.probe_domain, relay.probe_helo, relay.connect_timeout,
            relay.command_timeout, relay.port_deadline, relay.greylist_max_wait, relay.audited_domain) == (
        "AUDIT1", "https://site.test", "sink.example.net", "helo.example.net", 1.25, 2.5, 33.0, 7.0, "example.org")
    assert options.proxy is not None
    assert (options.proxy.targets, options.proxy.connect_timeout, options.proxy.step_timeout) == (targets, 1.25, 4.5)
    assert options.connect_timeout == 1.25
    # without a canary, proxy ports get the reachability check only
    bare = ProbeOptions.for_audit(settings, "AUDIT2")
    assert bare.proxy is None and bare.relay.audited_domain is None
    units = PLANNERS["proxy"]("192.0.2.20", [3128], bare)
    assert [u.names for u in units] == [("proxy.reachable",)]


async def test_the_planned_names_are_the_rows_a_unit_emits(open_port):
    """A relay unit promises one row per variant, and emits exactly those."""
    settings_like = ProbeOptions.for_audit(Settings(connect_timeout=2, smtp_command_timeout=2), "AUDIT3")
    (unit,) = PLANNERS["relay"]("127.0.0.1", [open_port], settings_like)
    rows = []

    async def emit(result):
        rows.append(result.name)

    await unit.run(emit, Slots())
    assert sorted(rows) == sorted(unit.names) and len(rows) == 22
