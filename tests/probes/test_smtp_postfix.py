"""The relay checks against Debian's real Postfix, started on loopback: open, closed, STARTTLS required."""

from __future__ import annotations

import asyncio

import pytest
from support import relay_port

from app.probes import smtp
from app.verdicts import Verdict
from servers.postfix import start_postfix


@pytest.fixture
def postfix(tmp_path, sink, postfix_ok):
    started = []

    async def start(kind: str):
        instance = await asyncio.to_thread(start_postfix, tmp_path, kind, sink_port=sink.port)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


async def test_open_postfix_relays_and_every_message_reaches_our_sink(postfix, sink):
    instance = await postfix("open")
    results = await relay_port(instance.port)
    open_ = {n: r for n, r in results.items() if r.verdict is Verdict.OPEN}
    # the plain forms relay on an open Postfix; every accepted message must then really arrive
    assert {"relay.v1", "relay.v2", "relay.v3", "relay.v4", "relay.v6", "relay.v7"} <= set(open_)
    tags = {r.tag for r in open_.values()}
    assert await sink.wait_for(tags, 10) == tags
    assert results["relay.v2"].fingerprint == {"product": "Postfix", "version": None,
                                               "raw": "mx.test.example ESMTP Postfix (Debian/GNU)\nmx.test.example"}
    # the rest were refused as syntax, never silently lost
    for name, result in results.items():
        if name not in open_:
            assert result.verdict in (Verdict.CLOSED, Verdict.INCONCLUSIVE), (name, result)


async def test_closed_postfix_denies_every_variant_within_its_error_limits(postfix):
    instance = await postfix("closed")
    started = asyncio.get_running_loop().time()
    results = await relay_port(instance.port)
    elapsed = asyncio.get_running_loop().time() - started
    assert {r.verdict for r in results.values()} == {Verdict.CLOSED}
    assert {r.reason for r in results.values()} == {"relay_denied"}
    assert "Relay access denied" in results["relay.v2"].detail
    # sessions of at most 8 variants stay under smtpd_soft_error_limit: no reply was slowed by error_sleep_time
    assert elapsed < 1.0 * len(smtp.VARIANTS) / smtp.VARIANTS_PER_SESSION, elapsed


async def test_postfix_that_requires_starttls_is_tested_after_starttls(postfix, sink):
    instance = await postfix("starttls")
    results = await relay_port(instance.port)
    v2 = results["relay.v2"]
    assert (v2.verdict, v2.reason) == (Verdict.OPEN, "accepted_unconfirmed")
    text = [line.text for line in v2.transcript]
    assert "STARTTLS" in text
    assert any("certificate subject: CN=mx.test.example" in line for line in text)
    assert await sink.wait_for({v2.tag}, 10) == {v2.tag}
