"""Relay classification against asyncio fakes, and the pieces it is built of."""

from __future__ import annotations

import pytest
from fakes import smtp as fakes
from support import PROBE_DOMAIN, Slots, relay_port

from app.probes import smtp
from app.probes.smtp_wire import MAX_REPLY_BYTES, Reply, check_command
from app.verdicts import Verdict

# the recipient forms at the target itself: accepted, they are local delivery until our sink receives them
AT_TARGET = {f"relay.{v.id}" for v in smtp.VARIANTS if v.to_target}
ACCEPTED_ALL = {("open", "accepted_unconfirmed"), ("closed", "accepted_as_local")}


def verdicts(results) -> set[tuple[str, str]]:
    return {(r.verdict.value, r.reason) for r in results.values()}


def accepted_split(results) -> None:
    """Every variant accepted through the end of data: open for a foreign recipient, local for one at the target."""
    for name, result in results.items():
        expected = ("closed", "accepted_as_local") if name in AT_TARGET else ("open", "accepted_unconfirmed")
        assert (result.verdict.value, result.reason) == expected, (name, result.detail)
        assert result.tag  # both keep their tag: our sink may still receive the message


async def serve(policy, sink=None):
    if sink is not None:
        policy.sink = ("127.0.0.1", sink.port, PROBE_DOMAIN)
    return fakes.FakeSmtpServer(policy)


# --- behaviours --------------------------------------------------------------------------------------------
async def test_closed_server_every_variant_relay_denied():
    async with await serve(fakes.Policy()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "relay_denied")}
    assert results["relay.v1"].fingerprint["product"] is None
    assert "554 5.7.1" in results["relay.v2"].detail


async def test_open_relay_is_open_and_confirmed_through_the_sink(sink):
    policy = fakes.OpenRelay()
    async with await serve(policy, sink) as server:
        results = await relay_port(server.port)
    accepted_split(results)  # every variant accepted through the end of data
    assert AT_TARGET == {f"relay.v{i}" for i in (10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22)}
    tags = {r.tag for r in results.values()}
    assert await sink.wait_for(tags, 5) == tags  # and every tagged message really arrived
    assert len(policy.messages) == 22
    mail_from, rcpts, body = policy.messages[0]
    assert b"X-Secure-Your-Server-Tag: sys" in body and b"requested by the owner of 127.0.0.1" in body


async def test_open_only_via_percent_hack(sink):
    """The percent hack addresses the server itself: accepted is local delivery until the message reaches our sink
    (then the audit makes the row open/delivered: tests/test_relay_audit.py)."""
    async with await serve(fakes.PercentHackRelay(), sink) as server:
        results = await relay_port(server.port)
    accepted = {n for n, r in results.items() if r.reason == "accepted_as_local"}
    assert accepted == {"relay.v11", "relay.v12", "relay.v13"}
    assert all(results[n].verdict is Verdict.CLOSED and results[n].tag for n in accepted)
    assert all(results[n].reason == "relay_denied" for n in set(results) - accepted)
    await sink.wait_for({results[n].tag for n in accepted}, 5)
    assert {results[n].tag for n in accepted} <= set(sink.arrivals)


async def test_open_only_via_bang_path(sink):
    async with await serve(fakes.BangPathRelay(), sink) as server:
        results = await relay_port(server.port)
    accepted = {n for n, r in results.items() if r.reason == "accepted_as_local"}
    assert accepted == {"relay.v19", "relay.v20", "relay.v21"}  # the bang-path recipients, all at the target
    await sink.wait_for({results[n].tag for n in accepted}, 5)
    assert {results[n].tag for n in accepted} <= set(sink.arrivals)


async def test_greylisting_retries_once_then_is_inconclusive():
    policy = fakes.Greylisting(delay=60)
    async with await serve(policy) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("inconclusive", "greylisted")}
    assert "Greylisted" in results["relay.v2"].detail
    assert sum("trying once more" in line.text
               for line in results["relay.v2"].transcript) == 1


async def test_greylisting_within_the_allowed_wait_gets_through(sink):
    policy = fakes.Greylisting(delay=0.5)
    async with await serve(policy, sink) as server:
        results = await relay_port(server.port, greylist_max_wait=2)
    accepted_split(results)


async def test_accept_then_reject_at_data_is_closed():
    async with await serve(fakes.RejectAtData()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "accepts_then_rejects")}


async def test_accept_then_reject_after_the_body_is_closed():
    async with await serve(fakes.RejectAfterBody()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "accepts_then_rejects")}


async def test_accept_and_discard_is_open_but_unconfirmed(sink):
    async with await serve(fakes.AcceptAndDiscard(), sink) as server:
        results = await relay_port(server.port)
    accepted_split(results)
    assert all(not r.confirmed for r in results.values())
    assert await sink.wait_for({r.tag for r in results.values()}, 0.3) == set()


async def test_421_after_a_few_commands_reconnects_and_goes_on():
    policy = fakes.DropsAfter(limit=12)
    async with await serve(policy) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "relay_denied")}
    assert policy.connections > 3  # it had to reconnect


async def test_a_server_that_always_drops_us_ends_in_dropped():
    async with await serve(fakes.DropsAfter(limit=2)) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("inconclusive", "dropped")}


async def test_tarpit_banner_times_out_every_variant():
    async with await serve(fakes.TarpitBanner(wait=5)) as server:
        results = await relay_port(server.port, command_timeout=0.5)
    assert verdicts(results) == {("inconclusive", "timeout")}


async def test_port_deadline_bounds_a_slow_server():
    async with await serve(fakes.TarpitBanner(wait=5)) as server:
        results = await relay_port(server.port, command_timeout=30, port_deadline=0.5)
    assert verdicts(results) == {("inconclusive", "timeout")}
    assert "time limit of 0.5 s" in results["relay.v1"].detail


async def test_endless_multiline_reply_is_a_protocol_error():
    async with await serve(fakes.EndlessMultiline()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "not_smtp")}
    received = [line.text for line in results["relay.v1"].transcript if line.dir == "in"]
    assert sum(len(text) for text in received) <= MAX_REPLY_BYTES  # the evidence of it is bounded too
    assert received[0].startswith("220-fake.test.example line 0 ")


async def test_garbage_is_not_smtp():
    async with await serve(fakes.Garbage()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "not_smtp")}
    assert any("\\x00\\x01" in line.text for line in results["relay.v1"].transcript)


async def test_helo_only_server_is_tested_after_the_fallback():
    async with await serve(fakes.HeloOnly()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("closed", "relay_denied")}
    sent = [line.text for line in results["relay.v1"].transcript if line.dir == "out"]
    assert sent[:2] == ["EHLO probe.test.example", "HELO probe.test.example"]


async def test_overlong_reply_line_is_a_protocol_error():
    async with await serve(fakes.LongLine()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("inconclusive", "protocol_error")}


@pytest.mark.parametrize("policy,expected", [
    (fakes.TemporaryRelayDenied, ("closed", "relay_denied")),
    (fakes.AuthRequired, ("auth_required", "auth_required_for_relay")),
    (fakes.SenderRejected, ("inconclusive", "sender_rejected")),
    (fakes.BlockedAtGreeting, ("inconclusive", "client_blocked")),
])
async def test_refusal_kinds(policy, expected):
    async with await serve(policy()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {expected}


async def test_refused_and_filtered_ports(refused_port, silent_port):
    results = await relay_port(refused_port)
    assert verdicts(results) == {("unreachable", "refused")}
    results = await relay_port(silent_port, connect_timeout=0.3)
    assert verdicts(results) == {("unreachable", "filtered")}


async def test_sessions_stay_within_the_connection_limit():
    slots = Slots(limit=2)
    async with await serve(fakes.Policy()) as server:
        await relay_port(server.port, slots=slots)
    assert slots.most == 2 and slots.total == 3  # 22 variants in sessions of at most 8


# --- the pieces --------------------------------------------------------------------------------------------
def test_variant_forms():
    forms = {v.id: smtp.addresses_for(v, tag="sys0123456789abcdef", probe_domain="T.example", host="192.0.2.5",
                                      name="mx.corp.example", audited_domain=None) for v in smtp.VARIANTS}
    got = {k: (a.mail_from, a.rcpt_to) for k, a in forms.items()}
    t, T = "sys0123456789abcdef", "T.example"
    assert got["v1"] == ("<>", f"<{t}@{T}>")
    assert got["v3"] == ("<sys-probe@mx.corp.example>", f"<{t}@{T}>")
    assert got["v5"] == ("<sys-probe>", f"<{t}@{T}>")
    assert got["v7"] == ("<sys-probe@corp.example>", f"<{t}@{T}>")
    assert got["v8"] == ("<mx.corp.example!sys-probe>", f"<{t}@{T}>")
    assert got["v9"][1] == f"{t}@{T}"
    assert got["v11"][1] == f'<"{t}%{T}">'
    assert got["v12"][1] == f"<{t}%{T}@[192.0.2.5]>"
    assert got["v15"][1] == f'<"{t}@{T}"@[192.0.2.5]>'
    assert got["v17"][1] == f"<@[192.0.2.5]:{t}@{T}>"
    assert got["v18"][1] == f"<@mx.corp.example:{t}@{T}>"
    assert got["v21"][1] == f"<{T}!{t}@mx.corp.example>"
    assert got["v22"][1] == f"<{t}@{T}@>"
    assert all(got[f"v{i}"][0] == "<sys-probe@[192.0.2.5]>" for i in range(9, 23))
    assert len(smtp.VARIANTS) == 22 and [v.id for v in smtp.VARIANTS] == list(smtp.VariantId)
    assert all(v.explanation for v in smtp.VARIANTS)
    v6 = smtp.addresses_for(smtp.VARIANTS[11], tag=t, probe_domain=T, host="2001:db8::25", name=None,
                            audited_domain="corp.example")
    assert v6.rcpt_to == f"<{t}%{T}@[IPv6:2001:db8::25]>"


@pytest.mark.parametrize("banner_word,expected", [
    ("mx.example.com", "mx.example.com"), ("ESMTP", None), ("localhost", None), ("192.0.2.1", None),
    ("evil.example.com\r\nRCPT", None), ("a..b", None), ("-x.example.com", None), ("x" * 300 + ".com", None),
])
def test_only_plain_hostnames_are_taken_from_banners(banner_word, expected):
    assert smtp.hostname_or_none(banner_word) == expected


@pytest.mark.parametrize("line", ["MAIL FROM:<a@b>\r\nRCPT TO:<x@y>", "EHLO x\n", "EHLO \x00", "A" * 1001])
def test_commands_cannot_carry_line_breaks_or_controls(line):
    with pytest.raises(ValueError):
        check_command(line)


@pytest.mark.parametrize("code,text,stage,expected", [
    (554, "5.7.1 <x@y>: Relay access denied", "rcpt", ("closed", "relay_denied")),
    (550, "5.7.1 Unable to relay", "rcpt", ("closed", "relay_denied")),
    (501, "5.1.3 Bad recipient address syntax", "rcpt", ("closed", "relay_denied")),
    (454, "4.7.1 <x@y>: Relay access denied", "rcpt", ("closed", "relay_denied")),
    (451, "4.7.1 Please try again later", "rcpt", ("inconclusive", "greylisted")),
    (450, "4.2.0 Greylisted", "rcpt", ("inconclusive", "greylisted")),
    (530, "5.7.0 Authentication required", "rcpt", ("auth_required", "auth_required_for_relay")),
    (550, "5.7.1 Relaying denied. Proper authentication required.", "rcpt",
     ("auth_required", "auth_required_for_relay")),
    (530, "5.7.0 Must issue a STARTTLS command first", "mail", ("inconclusive", "starttls_required")),
    (553, "5.1.8 Sender address rejected: Domain not found", "rcpt", ("inconclusive", "sender_rejected")),
    (450, "4.1.8 <s@x>: Sender address rejected: Domain not found", "rcpt", ("inconclusive", "sender_rejected")),
    (501, "5.1.7 Bad sender address syntax", "mail", ("inconclusive", "sender_rejected")),
    (554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "rcpt",
     ("inconclusive", "client_blocked")),
    (554, "5.7.1 Transaction failed", "data", ("closed", "accepts_then_rejects")),
    (550, "Message rejected", "end", ("closed", "accepts_then_rejects")),
    (452, "4.3.1 Insufficient system storage", "end", ("inconclusive", "greylisted")),
])
def test_classification(code, text, stage, expected):
    outcome = smtp.classify_refusal(Reply(code, (text,)), stage)
    assert (outcome.verdict.value, outcome.reason) == expected


def test_reply_enhanced_code_must_match_the_class():
    assert Reply(554, ("5.7.1 denied",)).enhanced == "5.7.1"
    assert Reply(554, ("4.7.1 denied",)).enhanced is None
    assert Reply(250, ("mx.example.com",)).enhanced is None


def test_greylist_delay_parsing():
    assert smtp.greylist_delay(Reply(450, ("Greylisted, try again in 300 seconds",))) == 300
    assert smtp.greylist_delay(Reply(451, ("Greylisted for 5 minutes",))) == 300
    assert smtp.greylist_delay(Reply(451, ("try later",))) is None


async def test_starttls_required_but_impossible_is_inconclusive():
    policy = fakes.StarttlsRequiredUnadvertised()
    async with await serve(policy) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("inconclusive", "starttls_required")}
    sent = [line.text for line in results["relay.v1"].transcript if line.dir == "out"]
    assert "STARTTLS" in sent  # it was tried although EHLO did not offer it


@pytest.mark.parametrize("raw,product,version", [
    ("mx.example.com ESMTP Postfix (Debian/GNU)", "Postfix", None),
    ("mail.example.com ESMTP Sendmail 8.15.2/8.15.2; Fri, 27 Nov 2026", "Sendmail", "8.15.2"),
    ("mx.example.com ESMTP Exim 4.96 Fri, 27 Nov 2026 10:00:00 +0000", "Exim", "4.96"),
    ("EX01.corp.local Microsoft ESMTP MAIL Service ready at Fri, 27 Nov 2026", "Microsoft Exchange", None),
    ("srv.corp.local Microsoft ESMTP MAIL Service, Version: 6.0.3790.3959 ready", "Microsoft IIS SMTP", "6.0.3790.3959"),
    ("mail.example.com ESMTP Service (Lotus Domino Release 8.5.3FP6) ready", "HCL/Lotus Domino", "8.5.3FP6"),
    ("mail.example.com ESMTP MDaemon 21.5.2; Fri, 27 Nov 2026", "MDaemon", "21.5.2"),
    ("mail.example.com ESMTP hMailServer", "hMailServer", None),
    ("mx.example.com ESMTP OpenSMTPD", "OpenSMTPD", None),
    ("mail.example.com ESMTP Zimbra 9.0", "Zimbra", "9.0"),
    ("mx.example.com ESMTP", None, None),
])
def test_fingerprints(raw, product, version):
    from app.probes.fingerprint import identify

    found = identify(raw)
    assert (found["product"], found["version"]) == (product, version)
    assert found["raw"] == raw


# --- issue 13: a login offered, names that look like words, refused sender forms ------------------------------
async def test_a_refused_relay_on_a_server_that_offers_auth_requires_a_login():
    async with await serve(fakes.AuthOffered()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("auth_required", "auth_required_for_relay")}
    assert "the server offers AUTH PLAIN LOGIN: it relays only for users who log in" in results["relay.v2"].detail
    assert "550" in results["relay.v2"].detail


async def test_words_inside_echoed_addresses_and_names_decide_nothing():
    """`<smtp-auth.login.example!sys-probe>` echoed in a 501 once made the row auth_required ("auth" matched)."""
    async with await serve(fakes.NamedAuth()) as server:
        results = await relay_port(server.port)
    assert (results["relay.v8"].verdict, results["relay.v8"].reason) == (Verdict.CLOSED, "sender_form_refused")
    assert "smtp-auth.login.example!sys-probe" in results["relay.v8"].detail
    assert (results["relay.v2"].verdict, results["relay.v2"].reason) == (Verdict.CLOSED, "relay_denied")
    assert {r.verdict for r in results.values()} == {Verdict.CLOSED}


async def test_a_refused_sender_form_is_closed_and_recipient_forms_are_tried_with_our_sender():
    async with await serve(fakes.LiteralSenderRefused()) as server:
        results = await relay_port(server.port)
    v4 = results["relay.v4"]  # the variant asks about the literal sender itself
    assert (v4.verdict, v4.reason) == (Verdict.CLOSED, "sender_form_refused")
    assert "501" in v4.detail and "it takes the sender <sys-probe@sink.test.example>" in v4.detail
    sent = [line.text for line in v4.transcript if line.dir == "out"]
    assert sent[-2] == "MAIL FROM:<sys-probe@sink.test.example>" and sent[-1].startswith("RCPT TO:<sys")
    assert not any(s.startswith("DATA") for s in sent)  # nothing sent for a sender form: RCPT was enough
    for i in range(9, 23):  # the recipient forms, tried with our plain sender
        row = results[f"relay.v{i}"]
        assert (row.verdict, row.reason) == (Verdict.CLOSED, "relay_denied"), (i, row.detail)
        assert "so the recipient form was tried with <sys-probe@sink.test.example>" in row.detail


async def test_an_open_relay_that_refuses_literal_senders_is_still_open(sink):
    async with await serve(fakes.LiteralSenderRefused(relay=True), sink) as server:
        results = await relay_port(server.port)
    assert (results["relay.v4"].verdict, results["relay.v4"].reason) == (Verdict.CLOSED, "sender_form_refused")
    for i in (9, 17, 18):  # recipient forms with a foreign domain: relayed with our plain sender
        assert (results[f"relay.v{i}"].verdict, results[f"relay.v{i}"].reason) == (Verdict.OPEN,
                                                                                   "accepted_unconfirmed")
    tags = {r.tag for r in results.values() if r.tag}
    assert await sink.wait_for(tags, 5) == tags


async def test_a_server_that_refuses_every_sender_leaves_the_variants_untested():
    async with await serve(fakes.SenderRejected()) as server:
        results = await relay_port(server.port)
    assert verdicts(results) == {("inconclusive", "sender_rejected")}
    assert any("once more with the sender" in line.text for line in results["relay.v4"].transcript)


@pytest.mark.parametrize("code,text,stage,expected", [
    (501, "<exim-auth.zoo.test!probe>: sender address must contain a domain", "mail",
     ("inconclusive", "sender_rejected")),
    (554, "5.7.1 <sys1@smtp-auth.example.com>: Relay access denied", "rcpt", ("closed", "relay_denied")),
    (550, "<t@login.example>: relaying denied", "rcpt", ("closed", "relay_denied")),
    (554, "<sys1@tls.example>: Relay access denied", "rcpt", ("closed", "relay_denied")),
    (550, "<x@[192.0.2.1]> relay to [login.example] denied", "rcpt", ("closed", "relay_denied")),
    (550, "Authentication required for relaying", "rcpt", ("auth_required", "auth_required_for_relay")),
])
def test_classification_reads_the_servers_own_words_only(code, text, stage, expected):
    outcome = smtp.classify_refusal(Reply(code, (text,)), stage)
    assert (outcome.verdict.value, outcome.reason) == expected


def test_auth_mechanisms_from_the_ehlo_reply():
    ehlo = Reply(250, ("mx.example", "PIPELINING", "AUTH PLAIN LOGIN", "AUTH=LOGIN CRAM-MD5", "auth xoauth2",
                       "AUTH <script> x" + "Y" * 30))
    assert smtp.auth_mechanisms(ehlo) == ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")  # no markup, no overlong names
    assert smtp.auth_mechanisms(Reply(250, ("mx.example", "SIZE 1000"))) == ()
    assert smtp.auth_mechanisms(None) == ()
    assert smtp.auth_mechanisms(Reply(250, ("mx.example", "AUTH " + " ".join(f"M{i}" for i in range(40))))) == \
        tuple(f"M{i}" for i in range(12))


@pytest.mark.parametrize("code,text,expected", [
    (550, "relay not permitted", ("auth_required", "auth_required_for_relay")),  # Exim
    (554, "5.7.1 <sys1@sink.example>: Recipient address rejected: Access denied", ("auth_required",
                                                                                   "auth_required_for_relay")),
    (454, "4.7.1 <sys1@sink.example>: Relay access denied", ("auth_required", "auth_required_for_relay")),
    # refusals of the address itself stay what they are, AUTH or not (Sendmail offers AUTH by default)
    (550, "5.1.1 <sys1@sink.example>... User unknown", ("closed", "relay_denied")),
    (553, "5.1.3 <a@b@[192.0.2.1]>... Invalid route address", ("closed", "relay_denied")),
    (550, "Invalid recipient: <sys1%sink.example@[192.0.2.1]>", ("closed", "relay_denied")),
    (501, "<sys1%sink.example@[192.0.2.1]>: domain literals not allowed", ("closed", "relay_denied")),  # Exim
    (550, "Restricted characters in address", ("closed", "relay_denied")),
    (530, "5.7.0 Authentication required", ("auth_required", "auth_required_for_relay")),
])
def test_a_refusal_from_a_server_that_offers_auth(code, text, expected):
    outcome = smtp.classify_refusal(Reply(code, (text,)), "rcpt", ("PLAIN", "LOGIN"))
    assert (outcome.verdict.value, outcome.reason) == expected
    if expected[0] == "auth_required":
        assert "the server offers AUTH PLAIN LOGIN" in outcome.note
    without = smtp.classify_refusal(Reply(code, (text,)), "rcpt")
    assert "offers" not in without.note
