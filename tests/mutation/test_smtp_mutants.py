"""Relay classification and proof (app/probes/smtp.py), pinned where mutants survived `make mutation`.

Every refusal's verdict, reason and note (the note is the evidence the owner reads), each branch of the
classification at its edge, and the proof itself: a variant is open only when the end of the message was
answered 2xx. The dialogue runs against a scripted connection, so each reply is exactly the one under test.
"""

from __future__ import annotations

import pytest
from support import relay_options

from app.probes import smtp
from app.probes.base import Finding
from app.probes.smtp import RelaySession, classify_refusal
from app.probes.smtp_wire import Dropped, Reply
from app.probes.transcript import Transcript
from app.verdicts import Verdict

I, C, A = Verdict.INCONCLUSIVE, Verdict.CLOSED, Verdict.AUTH_REQUIRED


@pytest.mark.parametrize("code,text,stage,expected", [
    (530, "5.7.0 Must issue a STARTTLS command first", "mail",
     (I, "starttls_required", "MAIL FROM answered 530 5.7.0: encryption required first")),
    (530, "Must issue a STARTTLS command first", "rcpt",  # 530 alone, no enhanced code
     (I, "starttls_required", "RCPT TO answered 530: encryption required first")),
    (554, "5.7.0 TLS required", "rcpt",  # 5.7.0 alone, without 530
     (I, "starttls_required", "RCPT TO answered 554 5.7.0: encryption required first")),
    (554, "5.7.1 Relay access denied, use a secure connection", "rcpt",  # TLS words alone are not enough
     (C, "relay_denied", "RCPT TO answered 554 5.7.1: recipient refused")),
    (530, "Go away", "rcpt", (A, "auth_required_for_relay", "RCPT TO answered 530: login required to relay")),
    (535, "Go away", "rcpt", (A, "auth_required_for_relay", "RCPT TO answered 535: login required to relay")),
    (554, "5.7.0 Go away", "rcpt",
     (A, "auth_required_for_relay", "RCPT TO answered 554 5.7.0: login required to relay")),
    (554, "5.7.8 Go away", "rcpt",
     (A, "auth_required_for_relay", "RCPT TO answered 554 5.7.8: login required to relay")),
    (550, "5.7.57 Go away", "rcpt",
     (A, "auth_required_for_relay", "RCPT TO answered 550 5.7.57: login required to relay")),
    (500, "Authentication needed", "rcpt",
     (A, "auth_required_for_relay", "RCPT TO answered 500: login required to relay")),
    (554, "Client host [192.0.2.1] blocked using zen.spamhaus.org", "data",
     (I, "client_blocked", "DATA answered 554: our test address is refused")),
    (550, "Go away", "mail", (I, "sender_rejected", "MAIL FROM answered 550: the sender was refused")),
    (553, "5.1.8 Domain not found", "rcpt", (I, "sender_rejected", "RCPT TO answered 553 5.1.8: the sender was refused")),
    (553, "5.1.7 Bad address", "rcpt", (I, "sender_rejected", "RCPT TO answered 553 5.1.7: the sender was refused")),
    (500, "Syntax error", "rcpt", (C, "relay_denied", "RCPT TO answered 500: recipient refused")),
    (454, "4.7.1 Relay access denied", "rcpt", (C, "relay_denied", "RCPT TO answered 454 4.7.1: relaying refused")),
    (450, "Try later", "data", (I, "greylisted", "DATA answered 450: come back later")),
    (554, "Transaction failed", "data",
     (C, "accepts_then_rejects", "DATA answered 554: the message was refused after the recipient")),
    (550, "5.7.1 Spam", "end",
     (C, "accepts_then_rejects", "the end of the message answered 550 5.7.1: the message was refused after the "
                                 "recipient")),
])
def test_each_refusal_is_classified_with_its_note(code, text, stage, expected):
    outcome = classify_refusal(Reply(code, (text,)), stage)
    assert (outcome.verdict, outcome.reason, outcome.note) == expected


def test_a_note_keeps_at_most_200_characters_of_the_reply():
    outcome = smtp._with_reply(Finding(C, "relay_denied", "n"), Reply(554, ("x" * 300,)))
    assert outcome.note == "n: " + "x" * 200


def test_only_a_temporary_refusal_carries_a_retry_delay():
    reply = Reply(451, ("try again in 30 seconds",))
    assert smtp._with_reply(Finding(I, "greylisted", "n"), reply).retry_after == 30
    assert smtp._with_reply(Finding(C, "relay_denied", "n"), reply).retry_after is None


# --- the forms of the addresses ----------------------------------------------------------------------------
def forms(variant_id: str, name: str | None, audited_domain: str | None = None) -> tuple[str, str]:
    variant = next(v for v in smtp.VARIANTS if v.id == variant_id)
    found = smtp.addresses_for(variant, tag="sys0123456789abcdef", probe_domain="T.example", host="192.0.2.5",
                               name=name, audited_domain=audited_domain)
    return found.mail_from, found.rcpt_to


def test_the_audited_domain_is_the_local_domain():
    assert forms("v7", "mx.corp.example", "audited.example")[0] == "<sys-probe@audited.example>"


def test_a_bang_path_without_a_name_uses_the_probe_domain_and_only_the_bang_path_does():
    assert forms("v8", None)[0] == "<T.example!sys-probe>"
    assert forms("v3", None)[0] == "<sys-probe@[192.0.2.5]>"
    assert forms("v13", None)[1] == "<sys0123456789abcdef%T.example@[192.0.2.5]>"


@pytest.mark.parametrize("name,audited,expected", [(None, None, None), ("example.com", None, "example.com"),
                                                   ("mx.example.com", None, "example.com"),
                                                   ("mx.example.com", "corp.example", "corp.example")])
def test_local_domain(name, audited, expected):
    assert smtp.local_domain(name, audited) == expected


def test_a_trailing_dot_of_a_banner_name_is_dropped():
    assert smtp.hostname_or_none("mx.example.com.") == "mx.example.com"
    assert smtp.hostname_or_none(" MX.Example.COM ") == "mx.example.com"
    assert smtp.hostname_or_none("mail.example.BOX.") == "mail.example.box"  # only the dot goes


@pytest.mark.parametrize("lines,keyword,offered", [
    (("mx", "PIPELINING", "starttls"), "STARTTLS", True),
    (("mx", "STARTTLS"), "STARTTLS", True),
    (("mx", "AUTH PLAIN LOGIN"), "AUTH", True),
    (("mx", "SIZE 100", "8BITMIME"), "STARTTLS", False),
    (("STARTTLS",), "STARTTLS", False),  # the first line is the server's name, not a keyword
    (("mx", "STARTTLS\tnow"), "STARTTLS", False),  # RFC 5321: a keyword ends at a space, nothing else
])
def test_ehlo_keywords(lines, keyword, offered):
    assert RelaySession._offers(Reply(250, lines), keyword) is offered


# --- the proof: a scripted dialogue ------------------------------------------------------------------------
class Scripted:
    """A connection whose replies are given per command verb (MAIL, RCPT, DATA, RSET, and "." for the message)."""

    def __init__(self, replies: dict[str, list[Reply]]) -> None:
        self.replies = {verb: list(queue) for verb, queue in replies.items()}
        self.sent: list[str] = []
        self.messages: list[bytes] = []
        self.transcript = Transcript()
        self.tls = False

    def _next(self, verb: str) -> Reply:
        queue = self.replies[verb]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    async def command(self, line: str) -> Reply:
        self.sent.append(line)
        return self._next(line.split(":")[0].split(" ")[0].upper())

    async def send_message(self, message: bytes) -> Reply:
        self.sent.append(".")
        self.messages.append(message)
        return self._next(".")


OK = Reply(250, ("2.0.0 Ok",))


def session(**replies: list[Reply]) -> tuple[RelaySession, Scripted]:
    script = {"MAIL": [OK], "RCPT": [OK], "DATA": [Reply(354, ("go ahead",))], ".": [OK], "RSET": [OK]}
    script.update({("." if k == "END" else k): v for k, v in replies.items()})
    relay = RelaySession("192.0.2.5", 2525, relay_options())
    relay.conn = Scripted(script)  # type: ignore[assignment]
    relay.greeting = smtp.Greeting(name="mx.corp.example", fingerprint=None)
    return relay, relay.conn  # type: ignore[return-value]


V2 = next(v for v in smtp.VARIANTS if v.id == "v2")


async def attempt(relay: RelaySession) -> Finding:
    outcome, _transcript = await relay.run_variant(V2, "sys0123456789abcdef")
    return outcome


async def test_open_only_when_the_end_of_the_message_is_answered_2xx():
    relay, conn = session(END=[Reply(200, ("ok",))])
    outcome = await attempt(relay)
    assert (outcome.verdict, outcome.reason) == (Verdict.OPEN, "accepted_unconfirmed")
    assert outcome.note == "accepted a message for <sys0123456789abcdef@sink.test.example> through the end of data (200)"
    assert conn.sent == ["MAIL FROM:<sys-probe@sink.test.example>", "RCPT TO:<sys0123456789abcdef@sink.test.example>",
                         "DATA", "."]


@pytest.mark.parametrize("code", [300, 302, 354])
async def test_a_3xx_at_the_end_of_the_message_is_no_proof(code):
    relay, _conn = session(END=[Reply(code, ("what",))])
    assert await attempt(relay) == Finding(I, "protocol_error", f"the end of the message answered {code}")


async def test_a_400_at_the_end_of_the_message_is_classified():
    relay, _conn = session(END=[Reply(400, ("later",))])
    outcome = await attempt(relay)
    assert (outcome.verdict, outcome.reason) == (I, "greylisted")


async def test_the_message_names_the_audit_the_helo_and_the_port():
    relay, conn = session()
    await attempt(relay)
    message = conn.messages[0].decode()
    assert "X-Secure-Your-Server-Audit: AUDIT\r\n" in message
    assert "From: Secure Your Server relay test <sys-probe@probe.test.example>\r\n" in message
    assert "the mail server at 192.0.2.5 port 2525 is an open relay" in message
    assert "X-Secure-Your-Server-Tag: sys0123456789abcdef\r\n" in message


@pytest.mark.parametrize("code,expected", [
    (200, (Verdict.OPEN, "accepted_unconfirmed")),  # any 2xx accepts the recipient
    (300, (I, "protocol_error")),
    (354, (I, "protocol_error")),
    (400, (I, "greylisted")),
])
async def test_the_recipient_step(code, expected):
    relay, _conn = session(RCPT=[Reply(code, ("x",))])
    outcome = await attempt(relay)
    assert (outcome.verdict, outcome.reason) == expected
    if expected[1] == "protocol_error":
        assert outcome.note == f"RCPT TO answered {code}: x"


@pytest.mark.parametrize("code,expected", [(250, (I, "protocol_error")), (400, (I, "greylisted")),
                                           (554, (C, "accepts_then_rejects"))])
async def test_the_data_step(code, expected):
    relay, conn = session(DATA=[Reply(code, ("x",))])
    outcome = await attempt(relay)
    assert (outcome.verdict, outcome.reason) == expected
    if expected[1] == "protocol_error":
        assert outcome.note == f"DATA answered {code}: x"
    assert "." not in conn.sent  # no message without a 354


async def test_a_refused_variant_is_reset_before_the_next_and_a_finished_one_is_not():
    relay, conn = session(RCPT=[Reply(554, ("5.7.1 Relay access denied",)), OK])
    await attempt(relay)  # refused at RCPT: the transaction is open
    await attempt(relay)  # RSET first, then accepted through the end
    await attempt(relay)  # a finished transaction needs no RSET
    verbs = [line.split(":")[0] for line in conn.sent]
    assert verbs == ["MAIL FROM", "RCPT TO",
                     "RSET", "MAIL FROM", "RCPT TO", "DATA", ".",
                     "MAIL FROM", "RCPT TO", "DATA", "."]


@pytest.mark.parametrize("where,said", [("MAIL", "421 at MAIL FROM"), ("RCPT", "421 at RCPT TO"),
                                        ("DATA", "421 at DATA"), ("END", "421 after the message")])
async def test_421_anywhere_drops_the_session_with_where_it_happened(where, said):
    relay, _conn = session(**{where: [Reply(421, ("closing",))]})
    with pytest.raises(Dropped) as info:
        await attempt(relay)
    assert str(info.value) == said


# --- a refused sender form: one more try with our plain sender ---------------------------------------------
V3 = next(v for v in smtp.VARIANTS if v.id == "v3")  # a sender form under test (the server's own name)
PLAIN = "MAIL FROM:<sys-probe@sink.test.example>"


async def attempt_v3(relay: RelaySession) -> Finding:
    outcome, _transcript = await relay.run_variant(V3, "sys0123456789abcdef")
    return outcome


async def test_a_temporary_refusal_of_the_sender_is_not_retried_with_another_sender():
    relay, conn = session(MAIL=[Reply(451, ("4.3.0 try later",))])
    outcome = await attempt_v3(relay)
    assert (outcome.verdict, outcome.reason) == (I, "sender_rejected")  # at MAIL: the sender, for now
    assert [line for line in conn.sent if line.startswith("MAIL")] == ["MAIL FROM:<sys-probe@mx.corp.example>"]


@pytest.mark.parametrize("code", [500, 501, 550])
async def test_a_sender_form_refused_for_good_is_tried_again_with_the_plain_sender_up_to_rcpt(code):
    relay, conn = session(MAIL=[Reply(code, ("5.1.7 bad sender address syntax",)), OK])
    outcome = await attempt_v3(relay)
    assert (outcome.verdict, outcome.reason) == (C, "sender_form_refused")
    assert outcome.note == (f"MAIL FROM answered {code} 5.1.7: the sender was refused: 5.1.7 bad sender address "
                            "syntax; it takes the sender <sys-probe@sink.test.example>, so it refuses this sender "
                            "form, and cannot relay with it")
    mails = [line for line in conn.sent if line.startswith("MAIL")]
    assert mails == ["MAIL FROM:<sys-probe@mx.corp.example>", PLAIN]
    assert conn.sent[-1].startswith("RCPT TO:") and "DATA" not in conn.sent  # the form is answered at RCPT


async def test_a_recipient_form_is_answered_with_the_plain_sender_through_the_end_of_data():
    v9 = next(v for v in smtp.VARIANTS if v.id == "v9")  # a recipient form; its sender is the address literal
    relay, conn = session(MAIL=[Reply(550, ("5.1.7 domain literals not allowed",)), OK])
    outcome, _transcript = await relay.run_variant(v9, "sys0123456789abcdef")
    assert (outcome.verdict, outcome.reason) == (Verdict.OPEN, "accepted_unconfirmed")
    assert outcome.note.startswith("the sender <sys-probe@[192.0.2.5]> was refused (MAIL FROM answered 550 5.1.7")
    assert conn.sent[-2:] == ["DATA", "."]
