"""The relay checks against real Exim, Sendmail and OpenSMTPD (extracted Debian packages, tests/servers/), every
row asserted.

Each test names, for its fixture, the verdict and reason of all 22 variants, and for every open one that its tagged
message really reached our sink. Where a row's verdict rests on what the server did afterwards (a message accepted
for the server itself), the server's own log is read to show it.
"""

from __future__ import annotations

import asyncio

from support import PROBE_DOMAIN, relay_port

from app.audits import Auditor
from app.probes import smtp

ALL = {f"relay.v{i}" for i in range(1, 23)}


def rows(results, names: set[str]) -> set[tuple[str, str]]:
    return {(results[n].verdict.value, results[n].reason) for n in names}


def names(*numbers: int) -> set[str]:
    return {f"relay.v{i}" for i in numbers}


def expect(results, table: dict[tuple[str, str], set[str]]) -> None:
    """`table` maps (verdict, reason) to the rows that must have it; together they are all 22 rows."""
    assert set().union(*table.values()) == ALL and sum(map(len, table.values())) == 22
    got = {n: (r.verdict.value, r.reason) for n, r in results.items()}
    want = {n: outcome for outcome, rows_ in table.items() for n in rows_}
    wrong = {n: (got[n], want[n], results[n].detail[:200]) for n in sorted(ALL) if got[n] != want[n]}
    assert not wrong, wrong


async def audit(settings, store, sink, port: int):
    """A whole relay audit of 127.0.0.1:port through the lifecycle, our sink confirming deliveries."""
    settings.relay_ports = [port]
    settings.probe_domain = PROBE_DOMAIN
    auditor = Auditor(settings, store, sink=sink)
    sink.on_delivery = auditor.delivered
    started = asyncio.get_running_loop().time()
    record = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["relay"])
    await asyncio.wait_for(asyncio.shield(auditor._tasks[record.id]), 60)
    done = await store.get_audit(record.id)
    return done, {c.result.name: c.result for c in done.checks}, asyncio.get_running_loop().time() - started


async def open_rows_arrive(results, sink) -> None:
    tags = {r.tag for r in results.values() if r.verdict.value == "open"}
    assert tags and await sink.wait_for(tags, 10) == tags


# --- Exim 4.96 ------------------------------------------------------------------------------------------------
# Sender forms Exim refuses whatever the relay policy (configure.default): domain literals (v4) and senders without
# a domain (v5 `<s>`, v8 `<H!s>`) at MAIL with 501; a sender at its own name or localhost (v3, v6) fails `require
# verify = sender` at RCPT (no such local user). Our plain sender passes, so those rows are sender_form_refused.
EXIM_SENDER_FORMS = names(3, 4, 5, 6, 8)


async def test_exim_open_relay(mta, sink):
    instance = await mta("exim", "open")
    results = await relay_port(instance.port)
    expect(results, {
        # relayed, and arrived: v9 (no angle brackets) and v18 (source route through its own name, which RFC 5321
        # says to ignore) were tried with our plain sender after the domain-literal sender was refused
        ("open", "accepted_unconfirmed"): names(1, 2, 7, 9, 18),
        ("closed", "sender_form_refused"): EXIM_SENDER_FORMS,
        # "Restricted characters in address" (%, !, @ in a local part), quoted or doubled-@ syntax, and any
        # recipient at [127.0.0.1] ("domain literals not allowed", also in a source route) are refused at RCPT
        ("closed", "relay_denied"): names(10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22),
    })
    await open_rows_arrive(results, sink)
    assert results["relay.v2"].fingerprint["product"] == "Exim"
    assert "Restricted characters in address" in results["relay.v13"].detail
    assert "domain literals not allowed" in results["relay.v12"].detail  # a recipient at [127.0.0.1] too
    assert "domain literals not allowed" in results["relay.v4"].detail
    assert "so the recipient form was tried with <sys-probe@sink.test.example>" in results["relay.v9"].detail
    # Exim's own delivery lines: every relayed message went to our sink on loopback, and nothing else was delivered
    log = instance.wait_log("T=sink_smtp")
    deliveries = [line for line in log.splitlines() if " => " in line]
    assert len(deliveries) == 5 and all("T=sink_smtp H=127.0.0.1 [127.0.0.1]" in line for line in deliveries), log


async def test_exim_closed(mta, sink):
    instance = await mta("exim", "closed")
    results = await relay_port(instance.port)
    expect(results, {
        ("closed", "relay_denied"): ALL - EXIM_SENDER_FORMS,
        ("closed", "sender_form_refused"): EXIM_SENDER_FORMS,
    })
    assert "relay not permitted" in results["relay.v2"].detail
    assert not sink.arrivals


async def test_exim_with_auth_says_a_login_is_required(mta, sink):
    """Issue 13: Exim with an authenticator was closed/relay_denied on every row; its EHLO after STARTTLS offers
    AUTH PLAIN LOGIN, so `550 relay not permitted` is a relay that needs a login: exactly the rows the open Exim
    relays. Refusals of the address itself (restricted characters, domain literals, syntax) stay relay_denied."""
    instance = await mta("exim", "auth")
    results = await relay_port(instance.port)
    expect(results, {
        ("auth_required", "auth_required_for_relay"): names(1, 2, 7, 9, 18),
        ("closed", "sender_form_refused"): EXIM_SENDER_FORMS,
        ("closed", "relay_denied"): names(10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22),
    })
    v2 = results["relay.v2"]
    assert "550" in v2.detail and "the server offers AUTH PLAIN LOGIN" in v2.detail
    text = [line.text for line in v2.transcript]
    assert "STARTTLS" in text and "250-AUTH PLAIN LOGIN" in text
    assert not sink.arrivals


# --- OpenSMTPD 6.8.0p2 ----------------------------------------------------------------------------------------
# Recipient forms OpenSMTPD refuses as syntax (501 5.1.3) or as an unknown address (550 Invalid recipient).
OPENSMTPD_REFUSED = names(9, 10, 11, 12, 14, 15, 16, 20, 22)
OPENSMTPD_AT_ITSELF = names(13, 19, 21)


async def test_opensmtpd_open_relay(mta, sink):
    instance = await mta("opensmtpd", "open")
    results = await relay_port(instance.port)
    expect(results, {
        ("open", "accepted_unconfirmed"): names(1, 2, 3, 4, 5, 6, 7, 8, 17, 18),
        # the "three forms": accepted, but not for a stranger's address
        ("closed", "accepted_as_local"): OPENSMTPD_AT_ITSELF,
        ("closed", "relay_denied"): OPENSMTPD_REFUSED,
    })
    await open_rows_arrive(results, sink)
    local_tags = {results[n].tag for n in OPENSMTPD_AT_ITSELF}
    assert all(local_tags) and await sink.wait_for(local_tags, 1) == set()
    # What OpenSMTPD really did with them (its log): `<T!t@mx>` and `<t%T@mx>` stayed addressed to mx.test.example,
    # which `for any` hands to the relay action unchanged: our sink refused them as not ours. None was rewritten
    # to the foreign address.
    log = instance.wait_log("accepts only Secure Your Server test messages")
    for n in ("relay.v13", "relay.v21"):
        tag = results[n].tag
        refused = [line for line in log.splitlines() if tag in line and "result=\"PermFail\"" in line]
        assert refused and "@mx.test.example>" in refused[0], (n, refused)


async def test_opensmtpd_closed(mta, sink):
    instance = await mta("opensmtpd", "closed")
    results = await relay_port(instance.port)
    expect(results, {("closed", "relay_denied"): ALL})
    assert "Invalid recipient" in results["relay.v2"].detail
    assert not sink.arrivals


async def test_opensmtpd_with_auth_requires_a_login_before_mail(mta, sink):
    """A submission-style listener (`auth <secrets>`): MAIL before AUTH is `530 5.5.1 ... Must issue an AUTH command
    first`. Debian 12's OpenSMTPD 6.8.0p2 cannot finish a TLS handshake under OpenSSL 3 (OpenSMTPD/OpenSMTPD#1171,
    #1239: "missing private key"), and it offers AUTH only over TLS, so the probe, after its STARTTLS failed, tests
    in plain text and sees no AUTH line: the rows are auth_required from the 530 alone, naming no mechanism."""
    instance = await mta("opensmtpd", "auth")
    results = await relay_port(instance.port)
    expect(results, {("auth_required", "auth_required_for_relay"): ALL})
    v2 = results["relay.v2"]
    assert "530 5.5.1" in v2.detail and "Must issue an AUTH command first" in v2.detail
    assert "the server offers" not in v2.detail
    assert "missing private key" in instance.log()
    assert not sink.arrivals


def test_the_variant_table_marks_the_forms_at_the_target():
    assert {f"relay.{v.id}" for v in smtp.VARIANTS if v.to_target} == names(10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22)
    assert {f"relay.{v.id}" for v in smtp.VARIANTS if v.tests_sender} == names(1, 2, 3, 4, 5, 6, 7, 8)


# --- Sendmail 8.17.1.9 ----------------------------------------------------------------------------------------
# Its percent hack, bang paths and quoted local parts are alive (nothing in the .mc turns them off), so the forms
# addressed to itself are rewritten to the foreign address: accepted_as_local at the probe, and every one of them
# reaches our sink. Doubled @ and an empty trailing domain are "553 5.1.3 Invalid route address".
SENDMAIL_AT_ITSELF = names(10, 11, 12, 13, 15, 19, 20, 21)
SENDMAIL_SYNTAX = names(14, 16, 22)


async def test_sendmail_open_relay(mta, sink):
    instance = await mta("sendmail", "open")
    results = await relay_port(instance.port)
    expect(results, {
        ("open", "accepted_unconfirmed"): names(1, 2, 3, 4, 6, 7, 8, 9, 17, 18),
        ("closed", "accepted_as_local"): SENDMAIL_AT_ITSELF,
        ("closed", "relay_denied"): SENDMAIL_SYNTAX,
        ("closed", "sender_form_refused"): names(5),  # "553 5.5.4 Domain name required for sender address"
    })
    await open_rows_arrive(results, sink)
    local_tags = {results[n].tag for n in SENDMAIL_AT_ITSELF}
    assert await sink.wait_for(local_tags, 10) == local_tags  # it did relay them: the audit makes them open
    assert "Invalid route address" in results["relay.v14"].detail
    assert results["relay.v2"].fingerprint["product"] == "Sendmail"
    traffic = instance.wait_log("Message accepted for delivery")
    assert f"RCPT To:<{results['relay.v13'].tag}@{PROBE_DOMAIN}>" in traffic  # the percent hack, rewritten


async def test_sendmail_open_relay_audit_confirms_the_rewritten_forms(mta, sink, settings, store):
    """The forms addressed to Sendmail itself that it rewrote and relayed are open/delivered once our sink has them:
    accepted_as_local is never the last word on a relay that really relays."""
    instance = await mta("sendmail", "open")
    settings.local_form_wait = 10.0
    done, rows, _ = await audit(settings, store, sink, instance.port)
    assert done.summary["relay"] == "open"
    delivered = {n for n, r in rows.items() if (r.verdict, r.reason, r.confirmed) == ("open", "delivered", True)}
    assert delivered == names(1, 2, 3, 4, 6, 7, 8, 9, 17, 18) | SENDMAIL_AT_ITSELF


async def test_sendmail_closed(mta, sink):
    instance = await mta("sendmail", "closed")
    results = await relay_port(instance.port)
    sender_forms = names(4, 5, 6)  # "553 5.5.4 Real domain name required" for [127.0.0.1] and localhost
    expect(results, {
        ("closed", "relay_denied"): ALL - sender_forms,
        ("closed", "sender_form_refused"): sender_forms,
    })
    assert "5.7.1" in results["relay.v2"].detail and "Relaying denied" in results["relay.v2"].detail
    assert "so the recipient form was tried with" in results["relay.v12"].detail
    assert not sink.arrivals


async def test_sendmail_with_auth_says_a_login_is_required(mta, sink):
    instance = await mta("sendmail", "auth")
    results = await relay_port(instance.port)
    sender_forms = names(4, 5, 6)
    expect(results, {
        ("auth_required", "auth_required_for_relay"): ALL - sender_forms - SENDMAIL_SYNTAX,
        ("closed", "sender_form_refused"): sender_forms,
        # "553 5.1.3 Invalid route address" is about the address, not a login: it stays what it is
        ("closed", "relay_denied"): SENDMAIL_SYNTAX,
    })
    v2 = results["relay.v2"]
    assert "Relaying denied. Proper authentication required." in v2.detail
    assert "the server offers AUTH PLAIN LOGIN" in v2.detail
    assert not sink.arrivals


async def test_opensmtpd_open_relay_audit_does_not_wait_for_what_it_kept(mta, sink, settings, store):
    """Issue 13: the three forms OpenSMTPD accepts for itself were open/accepted_unconfirmed and the audit waited
    the whole SECURE_SINK_WAIT for them. Now they are closed/accepted_as_local after SECURE_LOCAL_FORM_WAIT."""
    instance = await mta("opensmtpd", "open")
    settings.sink_wait = 60.0
    settings.local_form_wait = 1.0
    settings.audit_deadline = 120
    done, rows, elapsed = await audit(settings, store, sink, instance.port)
    assert elapsed < 20, elapsed
    assert done.summary["relay"] == "open"
    assert {n for n, r in rows.items() if r.reason == "accepted_as_local"} == OPENSMTPD_AT_ITSELF
    assert {n for n, r in rows.items() if r.reason == "delivered"} == names(1, 2, 3, 4, 5, 6, 7, 8, 17, 18)
