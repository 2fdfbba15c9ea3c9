"""The relay checks against Debian's real Postfix, started on loopback: open, closed, STARTTLS required, and the
stock submission service (STARTTLS, then SASL). Every row asserted."""

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


AT_ITSELF = {f"relay.{v.id}" for v in smtp.VARIANTS if v.to_target}


async def test_open_postfix_relays_and_every_message_reaches_our_sink(postfix, sink):
    instance = await postfix("open")
    results = await relay_port(instance.port)
    # every form is accepted: the foreign recipients are open, the forms addressed to Postfix itself are local at
    # first (it dequotes, swaps bang paths and does the percent hack: allow_percent_hack, swap_bangpath)
    for name, result in results.items():
        expected = ("closed", "accepted_as_local") if name in AT_ITSELF else ("open", "accepted_unconfirmed")
        assert (result.verdict.value, result.reason) == expected, (name, result.detail)
    # and every one really reached our sink, rewritten to the foreign address: an audit makes all 22 open
    tags = {r.tag for r in results.values()}
    assert len(tags) == 22 and await sink.wait_for(tags, 10) == tags
    assert results["relay.v2"].fingerprint == {"product": "Postfix", "version": None,
                                               "raw": "mx.test.example ESMTP Postfix (Debian/GNU)\nmx.test.example"}


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


async def test_postfix_submission_requires_a_login(postfix, sink):
    """Issue 13: the stock submission service (STARTTLS required, then SASL, smtpd_tls_auth_only) was
    closed/relay_denied on every row. After STARTTLS its EHLO offers AUTH, and every stranger's recipient gets
    `554 5.7.1 ... Recipient address rejected: Access denied`: a relay that needs a login."""
    instance = await postfix("submission")
    results = await relay_port(instance.port)
    assert {(r.verdict, r.reason) for r in results.values()} == {(Verdict.AUTH_REQUIRED, "auth_required_for_relay")}
    v2 = results["relay.v2"]
    assert "554 5.7.1" in v2.detail and "Access denied" in v2.detail
    offer = v2.detail.split("the server offers AUTH ", 1)[1].split(":", 1)[0].split()
    assert {"PLAIN", "LOGIN"} <= set(offer), v2.detail
    text = [line.text for line in v2.transcript]
    starttls = text.index("STARTTLS")
    assert not any(line.startswith("250-AUTH") for line in text[:starttls])  # smtpd_tls_auth_only
    assert any(line.startswith(("250-AUTH", "250 AUTH")) for line in text[starttls:])
    assert "postfix/submission/smtpd" in instance.log()
    assert not sink.arrivals


async def test_postfix_that_requires_starttls_is_tested_after_starttls(postfix, sink):
    instance = await postfix("starttls")
    results = await relay_port(instance.port)
    v2 = results["relay.v2"]
    assert (v2.verdict, v2.reason) == (Verdict.OPEN, "accepted_unconfirmed")
    text = [line.text for line in v2.transcript]
    assert "STARTTLS" in text
    assert any("certificate subject: CN=mx.test.example" in line for line in text)
    assert await sink.wait_for({v2.tag}, 10) == {v2.tag}
