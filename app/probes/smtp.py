"""Open-relay checks: every variant of the relay table, on every mail port, each with its own verdict.

A variant is open only with proof: a foreign recipient (always our own sink address) accepted through the end of
the message; `confirmed` once the message reaches our sink. Refusals are classified from the parsed reply code,
enhanced status code and text, at the step where they happen. Variants are spread over a few sessions so that no
session runs into the server's error limits (Postfix slows down after 10 errors and hangs up after 20).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import re
import time
from dataclasses import dataclass, replace
from enum import StrEnum

from app.config import Settings
from app.probes.base import Emit, Ended, Finding, SlotFactory, check_result, connect_failure
from app.probes.fingerprint import identify
from app.probes.sink import TAG_HEADER, new_tag
from app.probes.smtp_wire import Dropped, ProtocolError, Reply, SmtpConnection, SmtpError, Timeout, TlsFailed
from app.probes.transcript import Transcript
from app.verdicts import Verdict

SENDER_LOCAL = "sys-probe"
IMPLICIT_TLS_PORTS = frozenset({465})
VARIANTS_PER_SESSION = 8  # at most ~8 errors per session: under Postfix's smtpd_soft_error_limit of 10
MAX_RECONNECTS = 3  # per session, after the server dropped us

REASONS = ("delivered", "accepted_unconfirmed", "accepts_then_rejects", "relay_denied", "greylisted",
           "auth_required_for_relay", "starttls_required", "sender_rejected", "client_blocked", "timeout",
           "refused", "filtered", "not_smtp", "protocol_error", "dropped", "internal_error", "accepted_as_local",
           "sender_form_refused")
# rows that carry their tag: our sink may still receive their message (and turn them open/delivered)
TAGGED_REASONS = frozenset({"accepted_unconfirmed", "accepted_as_local"})
MAX_AUTH_MECHANISMS = 12


class VariantId(StrEnum):
    """The relay table's check ids (rows relay.v1 ... relay.v22): stable, stored with every audit."""

    V1 = "v1"
    V2 = "v2"
    V3 = "v3"
    V4 = "v4"
    V5 = "v5"
    V6 = "v6"
    V7 = "v7"
    V8 = "v8"
    V9 = "v9"
    V10 = "v10"
    V11 = "v11"
    V12 = "v12"
    V13 = "v13"
    V14 = "v14"
    V15 = "v15"
    V16 = "v16"
    V17 = "v17"
    V18 = "v18"
    V19 = "v19"
    V20 = "v20"
    V21 = "v21"
    V22 = "v22"


@dataclass(frozen=True)
class Variant:
    id: VariantId
    mail_from: str  # templates: {s} sender local part, {t} tag, {T} probe domain, {H} target name,
    rcpt_to: str  # {lit} the target's address literal (1.2.3.4 or IPv6:...), {D} the local-looking domain
    explanation: str
    # The recipient form's domain is the target itself (its name or address literal) or missing (a quoted or bang
    # local part, an empty domain): accepting it is local delivery, not relaying, unless the message reaches us.
    to_target: bool = False

    @property
    def tests_sender(self) -> bool:
        """The variant asks about a sender form (its recipient is the plain foreign address)."""
        return self.rcpt_to == PLAIN_RECIPIENT


PLAIN_RECIPIENT = "<{t}@{T}>"


# The relay table (nmap's 16 smtp-open-relay tests, abuse.net's, DSBL's and mailradar's extra forms).
# The recipient is always our own sink address, however the form disguises it.
VARIANTS: tuple[Variant, ...] = (
    Variant(VariantId.V1, "<>", "<{t}@{T}>", "Empty sender (like a bounce) to a stranger's address."),
    Variant(VariantId.V2, "<{s}@{T}>", "<{t}@{T}>", "A stranger writing to a stranger: the classic relay test."),
    Variant(VariantId.V3, "<{s}@{H}>", "<{t}@{T}>", "A sender that claims to be your server's own name."),
    Variant(VariantId.V4, "<{s}@[{lit}]>", "<{t}@{T}>", "A sender at your server's own address literal."),
    Variant(VariantId.V5, "<{s}>", "<{t}@{T}>",
            "A sender without a domain, which some servers complete with their own."),
    Variant(VariantId.V6, "<{s}@localhost>", "<{t}@{T}>", "A sender that claims to be the server itself (localhost)."),
    Variant(VariantId.V7, "<{s}@{D}>", "<{t}@{T}>",
            "A sender in your own domain: servers that trust local senders relay."),
    Variant(VariantId.V8, "<{H}!{s}>", "<{t}@{T}>", "An old UUCP bang-path sender."),
    Variant(VariantId.V9, "<{s}@[{lit}]>", "{t}@{T}", "The recipient without angle brackets."),
    Variant(VariantId.V10, "<{s}@[{lit}]>", "<\"{t}@{T}\">", "The recipient address in quotes.", to_target=True),
    Variant(VariantId.V11, "<{s}@[{lit}]>", "<\"{t}%{T}\">", "A quoted percent-hack recipient.", to_target=True),
    Variant(VariantId.V12, "<{s}@[{lit}]>", "<{t}%{T}@[{lit}]>",
            "The percent hack via your address literal.", to_target=True),
    Variant(VariantId.V13, "<{s}@[{lit}]>", "<{t}%{T}@{H}>",
            "The percent hack via your server's name.", to_target=True),
    Variant(VariantId.V14, "<{s}@[{lit}]>", "<{t}@{T}@[{lit}]>",
            "A doubled @ ending in your address literal.", to_target=True),
    Variant(VariantId.V15, "<{s}@[{lit}]>", "<\"{t}@{T}\"@[{lit}]>",
            "A quoted foreign address at your address literal.", to_target=True),
    Variant(VariantId.V16, "<{s}@[{lit}]>", "<{t}@{T}@{H}>",
            "A doubled @ ending in your server's name.", to_target=True),
    Variant(VariantId.V17, "<{s}@[{lit}]>", "<@[{lit}]:{t}@{T}>", "A source route through your address literal."),
    Variant(VariantId.V18, "<{s}@[{lit}]>", "<@{H}:{t}@{T}>", "A source route through your server's name."),
    Variant(VariantId.V19, "<{s}@[{lit}]>", "<{T}!{t}>", "A bang-path recipient.", to_target=True),
    Variant(VariantId.V20, "<{s}@[{lit}]>", "<{T}!{t}@[{lit}]>",
            "A bang path at your address literal.", to_target=True),
    Variant(VariantId.V21, "<{s}@[{lit}]>", "<{T}!{t}@{H}>", "A bang path at your server's name.", to_target=True),
    Variant(VariantId.V22, "<{s}@[{lit}]>", "<{t}@{T}@>", "A recipient with an empty trailing domain.", to_target=True),
)

_HOSTNAME = re.compile(r"^(?=.{4,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


def hostname_or_none(text: str) -> str | None:
    """A DNS name taken from remote words, only if it is a plain multi-label hostname (no quoting games)."""
    candidate = text.strip().rstrip(".")
    return candidate.lower() if _HOSTNAME.match(candidate) and not candidate.replace(".", "").isdigit() else None


def address_literal(host: str) -> str:
    address = ipaddress.ip_address(host)
    return f"IPv6:{address.compressed}" if address.version == 6 else str(address)


def local_domain(name: str | None, audited_domain: str | None) -> str | None:
    """D: the audited domain, or the domain part of the server's name (mx.example.com -> example.com)."""
    if audited_domain:
        return audited_domain
    if name and name.count(".") >= 2:
        return name.split(".", 1)[1]
    return name


@dataclass
class Addresses:
    tag: str
    mail_from: str
    rcpt_to: str


def addresses_for(variant: Variant, *, tag: str, probe_domain: str, host: str, name: str | None,
                  audited_domain: str | None) -> Addresses:
    lit = address_literal(host)
    values = {"s": SENDER_LOCAL, "t": tag, "T": probe_domain, "lit": lit,
              "H": name or f"[{lit}]", "D": local_domain(name, audited_domain) or f"[{lit}]"}
    if variant.id is VariantId.V8 and not name:  # a bang path needs a name; an address literal would not parse
        values["H"] = probe_domain
    return Addresses(tag, variant.mail_from.format(**values), variant.rcpt_to.format(**values))


# --- classification of refusals ----------------------------------------------------------------------------
_STARTTLS = re.compile(r"starttls|\btls\b|encrypt|secure connection", re.IGNORECASE)
_AUTH = re.compile(r"authenticat|\bauth\b|log ?in|sasl|smtp after pop", re.IGNORECASE)
_CLIENT = re.compile(r"client host|blocked using|listed (?:at|in|on)|spamhaus|\brbl\b|\bdnsbl\b|blocklist|"
                     r"blacklist|\bpbl\b|reverse (?:dns|hostname)|your (?:ip|address)|too many (?:connections|errors)"
                     r"|rate limit", re.IGNORECASE)
_SENDER = re.compile(r"sender (?:address )?(?:rejected|refused|denied|unknown|invalid|verify failed)|"
                     r"domain of sender|sender domain|unqualified sender|domain name required for sender|"
                     r"bad sender|sender not", re.IGNORECASE)
_RELAY = re.compile(r"relay|relaying|access denied|not permitted|unauthori[sz]ed|not allowed|"
                    r"not local|we do not relay|no such (?:user|domain) here|not accepted here", re.IGNORECASE)
# the words of a refusal on relay policy, without a 5.7.x code (Exim's "550 relay not permitted"); narrower than
# _RELAY, whose "not allowed" also covers refusals of the address itself ("domain literals not allowed")
_RELAY_POLICY = re.compile(r"relay|access denied|not permitted|unauthori[sz]ed", re.IGNORECASE)
_GREYLIST_DELAY = re.compile(r"(\d{1,5}(?:\.\d{1,3})?)\s*(seconds?|secs?|s\b|minutes?|mins?|m\b)", re.IGNORECASE)


# Echoed addresses, bang paths, address literals and host names: a reply's words are read without them, so that a
# name such as smtp-auth.example.com or <exim-auth.zoo.test!probe> can never decide a verdict.
_ECHOED = re.compile(r"<[^>]*>|\[[^\]]*\]|\S*[@!%]\S*|\S*\w\.\w\S*")


def prose(text: str) -> str:
    """The reply's own words: what the server echoed of addresses and names taken out."""
    return " ".join(_ECHOED.sub(" ", text).split())


def classify_refusal(reply: Reply, stage: str, mechanisms: tuple[str, ...] = ()) -> Finding:
    """A negative reply at MAIL, RCPT, DATA or end of data -> its verdict, from the reply code, the enhanced status
    code, the reply's own words (never from echoed addresses or names) and the AUTH mechanisms the server offered."""
    return with_login_offer(_refusal(reply, stage), reply, mechanisms)


def _refusal(reply: Reply, stage: str) -> Finding:
    """Order matters: the most specific first."""
    text, enhanced = prose(reply.text), reply.enhanced or ""
    where = {"mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA", "end": "the end of the message"}[stage]
    note = f"{where} answered {reply.code}{' ' + enhanced if enhanced else ''}"
    if (enhanced == "5.7.0" and _STARTTLS.search(text)) or (reply.code == 530 and _STARTTLS.search(text)):
        return Finding(Verdict.INCONCLUSIVE, "starttls_required", note + ": encryption required first")
    if reply.code in (530, 535) or enhanced in ("5.7.0", "5.7.8", "5.7.57") or (
            reply.code >= 500 and _AUTH.search(text)):
        return Finding(Verdict.AUTH_REQUIRED, "auth_required_for_relay", note + ": login required to relay")
    if _CLIENT.search(text):
        return Finding(Verdict.INCONCLUSIVE, "client_blocked", note + ": our test address is refused")
    if stage == "mail" or enhanced.endswith((".1.7", ".1.8")) or _SENDER.search(text):
        return Finding(Verdict.INCONCLUSIVE, "sender_rejected", note + ": the sender was refused")
    if reply.code < 500:
        if _RELAY.search(text):  # "454 4.7.1 Relay access denied": a temporary form of a refusal
            return Finding(Verdict.CLOSED, "relay_denied", note + ": relaying refused")
        return Finding(Verdict.INCONCLUSIVE, "greylisted", note + ": come back later")
    if stage == "rcpt":
        return Finding(Verdict.CLOSED, "relay_denied", note + ": recipient refused")
    return Finding(Verdict.CLOSED, "accepts_then_rejects", note + ": the message was refused after the recipient")


_MECHANISM = re.compile(r"^[A-Z0-9][A-Z0-9_-]{0,19}$")


def auth_mechanisms(ehlo: Reply | None) -> tuple[str, ...]:
    """The SASL mechanisms of the EHLO reply's AUTH line (`AUTH PLAIN LOGIN`, old `AUTH=PLAIN`), plain names only."""
    if ehlo is None:
        return ()
    found: list[str] = []
    for line in ehlo.lines[1:]:
        words = line.strip().upper().replace("=", " ", 1).split()
        if words[:1] == ["AUTH"]:
            found += [w for w in words[1:] if _MECHANISM.match(w) and w not in found]
    return tuple(found[:MAX_AUTH_MECHANISMS])


def with_login_offer(finding: Finding, reply: Reply, mechanisms: tuple[str, ...]) -> Finding:
    """A relay refused to a stranger by a server that offers AUTH relays only for users who log in: say so, with the
    mechanisms it offered. Only a refusal on policy counts (an enhanced code 5.7.x/4.7.x, or none and words of a
    relay refusal), not one about the address itself (`550 5.1.1 User unknown`, `553 5.1.3 Invalid route address`).
    Without an AUTH line a refusal stays what it is."""
    if not mechanisms:
        return finding
    offer = "AUTH " + " ".join(mechanisms)
    if finding.reason == "auth_required_for_relay":
        return replace(finding, note=f"{finding.note} (the server offers {offer})")
    enhanced = reply.enhanced
    policy = enhanced[2:4] == "7." if enhanced else bool(_RELAY_POLICY.search(prose(reply.text)))
    if finding.reason == "relay_denied" and policy:
        return Finding(Verdict.AUTH_REQUIRED, "auth_required_for_relay",
                       f"{finding.note}; the server offers {offer}: it relays only for users who log in")
    return finding


def greylist_delay(reply: Reply) -> float | None:
    match = _GREYLIST_DELAY.search(reply.text)
    if not match:
        return None
    value = float(match.group(1))
    return value * 60 if match.group(2).lower().startswith("m") else value


# --- the tagged message ------------------------------------------------------------------------------------
def probe_message(*, addresses: Addresses, audit_id: str, site_url: str, helo: str, host: str, port: int,
                  variant: Variant) -> bytes:
    date = email.utils.formatdate(usegmt=True)
    lines = [
        f"From: Secure Your Server relay test <{SENDER_LOCAL}@{helo}>",
        f"To: <{addresses.tag}@{helo}>",
        f"Subject: Open relay test {addresses.tag} ({variant.id}) requested by the owner of {host}",
        f"Date: {date}",
        f"Message-ID: <{addresses.tag}.{int(time.time())}@{helo}>",
        f"{TAG_HEADER}: {addresses.tag}",
        f"X-Secure-Your-Server-Audit: {audit_id}",
        "Auto-Submitted: auto-generated",
        "Precedence: bulk",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This message tests whether the mail server at {host} port {port} is an open relay.",
        "The owner of that address asked for the test. It is addressed only to the testing",
        "site's own mailbox; if it arrives there, the server relays mail for strangers.",
        f"Audit: {site_url.rstrip('/')}/audits/{audit_id}",
        f"Variant {variant.id}: MAIL FROM:{addresses.mail_from} RCPT TO:{addresses.rcpt_to}",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")


# --- sessions ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayOptions:
    audit_id: str
    site_url: str
    probe_domain: str
    probe_helo: str
    connect_timeout: float
    command_timeout: float
    port_deadline: float
    greylist_max_wait: float
    audited_domain: str | None

    @classmethod
    def from_settings(cls, settings: Settings, audit_id: str, audited_domain: str | None) -> RelayOptions:
        return cls(audit_id=audit_id, site_url=settings.public_url, probe_domain=settings.probe_domain,
                   probe_helo=settings.probe_helo, connect_timeout=settings.connect_timeout,
                   command_timeout=settings.smtp_command_timeout, port_deadline=settings.smtp_port_deadline,
                   greylist_max_wait=settings.greylist_max_wait, audited_domain=audited_domain)


@dataclass
class Greeting:
    name: str | None
    fingerprint: dict[str, str | None] | None


class RelaySession:
    """One connection: greeting, EHLO/HELO, STARTTLS when offered, then variants separated by RSET."""

    def __init__(self, host: str, port: int, options: RelayOptions, use_starttls: bool = True) -> None:
        self.host, self.port, self.options = host, port, options
        self.use_starttls = use_starttls
        self.prelude = Transcript()
        self.conn = SmtpConnection(host, port, self.prelude, options.command_timeout)
        self.greeting: Greeting | None = None
        self.starttls_offered = False
        self.needs_rset = False
        self.mechanisms: tuple[str, ...] = ()  # AUTH mechanisms of the latest EHLO reply

    async def open(self) -> Greeting:
        """Connect, greet, upgrade to TLS when offered. Ended: nothing can be tested on this connection."""
        banner = await self._connect()
        if banner.code != 220:
            raise Ended(Verdict.INCONCLUSIVE, "client_blocked",
                        f"the greeting was {banner.code}: the server refuses to talk to us")
        ehlo = await self._hello()
        if ehlo is not None and self.use_starttls and self._offers(ehlo, "STARTTLS") and not self.conn.tls:
            self.starttls_offered = True
            await self.conn.starttls()
            if self.conn.tls:
                ehlo = await self._hello()
        words = "\n".join([banner.text] + ([ehlo.lines[0]] if ehlo is not None else []))
        first_word = banner.lines[0].split()[0] if banner.lines and banner.lines[0].split() else ""
        ehlo_word = ehlo.lines[0].split()[0] if ehlo is not None and ehlo.lines[0].split() else ""
        name = hostname_or_none(first_word) or hostname_or_none(ehlo_word)
        self.greeting = Greeting(name=name, fingerprint=identify(words))
        return self.greeting

    async def _connect(self) -> Reply:
        implicit = self.port in IMPLICIT_TLS_PORTS
        self.prelude.info(f"connecting to {self.host} port {self.port}" + (" (TLS)" if implicit else ""))
        try:
            return await self.conn.open(self.options.connect_timeout, implicit_tls=implicit)
        except TlsFailed as exc:
            raise Ended(Verdict.INCONCLUSIVE, "protocol_error", str(exc)) from None
        except ProtocolError as exc:
            raise Ended(Verdict.CLOSED, "not_smtp", f"the port does not speak SMTP ({exc})") from None
        except OSError as exc:  # refused, unreachable, silent (TimeoutError)
            failure = connect_failure(exc, self.options.connect_timeout)
            raise Ended(failure.verdict, failure.reason, failure.note) from None

    async def _hello(self) -> Reply | None:
        """EHLO, HELO as the fallback; None when only HELO worked."""
        reply = await self.conn.command(f"EHLO {self.options.probe_helo}")
        if reply.code == 250:
            self.mechanisms = auth_mechanisms(reply)
            return reply
        if reply.code == 421:
            raise Dropped("421 at EHLO")
        reply = await self.conn.command(f"HELO {self.options.probe_helo}")
        if reply.code == 250:
            return None
        raise Ended(Verdict.INCONCLUSIVE, "client_blocked", f"EHLO and HELO were both refused ({reply.code})")

    @staticmethod
    def _offers(ehlo: Reply, keyword: str) -> bool:
        return any(line.strip().upper().split(" ")[0] == keyword for line in ehlo.lines[1:])

    async def run_variant(self, variant: Variant, tag: str,
                          transcript: Transcript | None = None) -> tuple[Finding, Transcript]:
        """One attempt; a retry passes the first attempt's transcript to continue it."""
        assert self.greeting is not None
        if transcript is None:
            transcript = self.prelude.fork()
            transcript.info(f"variant {variant.id}: {variant.explanation}")
        self.conn.transcript = transcript
        addresses = addresses_for(variant, tag=tag, probe_domain=self.options.probe_domain, host=self.host,
                                  name=self.greeting.name, audited_domain=self.options.audited_domain)
        return await self._attempt(variant, addresses), transcript

    async def upgrade(self) -> bool:
        """STARTTLS although EHLO did not offer it (the server just said it requires it); False if refused."""
        await self._reset()
        await self.conn.starttls()
        if not self.conn.tls:
            return False
        await self._hello()
        return True

    async def _reset(self) -> None:
        if self.needs_rset:
            reply = await self.conn.command("RSET")
            if not reply.positive:  # 421, or Exim's "554 Too many nonmail commands": this session is over
                raise Dropped(f"{reply.code} at RSET")
            self.needs_rset = False

    async def _attempt(self, variant: Variant, addresses: Addresses) -> Finding:
        """The variant's transaction; when the server refuses its sender form for good, the same recipient once
        more with our plain sender, to tell a refused form from a refused tester."""
        finding, refusal = await self._transaction(variant, addresses)
        fallback = replace(addresses, mail_from=f"<{SENDER_LOCAL}@{self.options.probe_domain}>")
        if refusal is None or refusal.code < 500 or addresses.mail_from == fallback.mail_from:
            return finding
        self.conn.transcript.info(f"the sender {addresses.mail_from} was refused: the same recipient once more "
                                  f"with the sender {fallback.mail_from}")
        second, again = await self._transaction(variant, fallback, until_rcpt=variant.tests_sender)
        if again is not None:  # our plain sender is refused too: this variant could not be tried
            return finding
        if variant.tests_sender:
            return Finding(Verdict.CLOSED, "sender_form_refused",
                           f"{finding.note}; it takes the sender {fallback.mail_from}, so it refuses this sender "
                           "form, and cannot relay with it")
        return replace(second, note=f"the sender {addresses.mail_from} was refused ({finding.note}), so the "
                                    f"recipient form was tried with {fallback.mail_from}: {second.note}")

    async def _transaction(self, variant: Variant, addresses: Addresses,
                           until_rcpt: bool = False) -> tuple[Finding, Reply | None]:
        """MAIL, RCPT, DATA, the message: how it ended, and the reply that refused the sender (if one did)."""
        await self._reset()
        self.needs_rset = True
        reply = await self._checked(f"MAIL FROM:{addresses.mail_from}")
        if not reply.positive:
            self.needs_rset = False  # a refused MAIL opens no transaction (RFC 5321 4.1.1.2): nothing to reset
            return _sender_or_not(_with_reply(classify_refusal(reply, "mail", self.mechanisms), reply), reply)
        reply = await self._checked(f"RCPT TO:{addresses.rcpt_to}")
        if reply.code // 100 != 2:
            return _sender_or_not(_refused_or_odd(reply, "rcpt", "RCPT TO", self.mechanisms), reply)
        if until_rcpt:
            return Finding(Verdict.INCONCLUSIVE, "protocol_error", "stopped after RCPT TO"), None
        reply = await self._checked("DATA")
        if reply.code != 354:
            return _sender_or_not(_refused_or_odd(reply, "data", "DATA"), reply)
        message = probe_message(addresses=addresses, audit_id=self.options.audit_id, site_url=self.options.site_url,
                                helo=self.options.probe_helo, host=self.host, port=self.port, variant=variant)
        reply = await self.conn.send_message(message)
        if reply.code == 421:
            raise Dropped("421 after the message")
        self.needs_rset = False  # a finished transaction needs no RSET
        return _end_of_data(variant, addresses, reply), None

    async def _checked(self, command: str) -> Reply:
        reply = await self.conn.command(command)
        if reply.code == 421:  # the server is closing this session: the variant is retried on a new one
            raise Dropped(f"421 at {command.split(':')[0]}")
        return reply

    async def close(self) -> None:
        await self.conn.close(quit=True)


def _with_reply(finding: Finding, reply: Reply) -> Finding:
    return replace(finding, note=f"{finding.note}: {reply.text[:200]}",
                   retry_after=greylist_delay(reply) if finding.reason == "greylisted" else None)


def _sender_or_not(finding: Finding, reply: Reply) -> tuple[Finding, Reply | None]:
    return finding, (reply if finding.reason == "sender_rejected" else None)


def _end_of_data(variant: Variant, addresses: Addresses, reply: Reply) -> Finding:
    """The answer to the message itself. Accepted for a recipient at the server itself (its name, its address
    literal, or no domain at all) is local delivery: not open unless our sink receives it."""
    if reply.code // 100 == 2 and variant.to_target:
        return Finding(Verdict.CLOSED, "accepted_as_local",
                       f"accepted a message for {addresses.rcpt_to} through the end of data ({reply.code}); that "
                       "address is at the server itself, so it keeps the message unless it reaches our sink")
    if reply.code // 100 == 2:
        return Finding(Verdict.OPEN, "accepted_unconfirmed",
                       f"accepted a message for {addresses.rcpt_to} through the end of data ({reply.code})")
    if reply.code >= 400:
        return _with_reply(classify_refusal(reply, "end"), reply)
    return Finding(Verdict.INCONCLUSIVE, "protocol_error", f"the end of the message answered {reply.code}")


def _refused_or_odd(reply: Reply, stage: str, command: str, mechanisms: tuple[str, ...] = ()) -> Finding:
    """A refusal at RCPT or DATA is classified; a positive code where none belongs is a protocol error."""
    if reply.code >= 400:
        return _with_reply(classify_refusal(reply, stage, mechanisms), reply)
    return _with_reply(Finding(Verdict.INCONCLUSIVE, "protocol_error", f"{command} answered {reply.code}"), reply)


# --- one port: variants spread over sessions ---------------------------------------------------------------
_ERROR_REASONS = {Dropped: "dropped", Timeout: "timeout", ProtocolError: "protocol_error"}


class _Port:
    """The variants of one port: each ends with exactly one emitted row, whatever the server does."""

    def __init__(self, emit: Emit, slot: SlotFactory, host: str, port: int, options: RelayOptions) -> None:
        self.emit, self.slot, self.host, self.port, self.options = emit, slot, host, port, options
        self.done: set[str] = set()
        self.fingerprint: dict[str, str | None] | None = None
        self.greeted = False  # the first greeting's fingerprint stands for the port

    def greeted_by(self, greeting: Greeting) -> None:
        if not self.greeted:
            self.greeted, self.fingerprint = True, greeting.fingerprint

    async def finish(self, variant: Variant, finding: Finding, transcript: Transcript, tag: str | None) -> None:
        if variant.id in self.done:
            return
        self.done.add(variant.id)
        await self.emit(check_result("relay", self.host, self.port, variant.id, finding, transcript,
                                     fingerprint=self.fingerprint,
                                     tag=tag if finding.reason in TAGGED_REASONS else None))

    async def run(self, variants: tuple[Variant, ...]) -> None:
        chunks = [variants[i:i + VARIANTS_PER_SESSION] for i in range(0, len(variants), VARIANTS_PER_SESSION)]
        try:
            async with asyncio.timeout(self.options.port_deadline):
                await asyncio.gather(*(_Chunk(self, chunk).run() for chunk in chunks))
        except TimeoutError:
            pass
        started = Transcript()
        cut = Finding(Verdict.INCONCLUSIVE, "timeout",
                      f"the port's time limit of {self.options.port_deadline:g} s ran out")
        for variant in variants:  # cut by the port's deadline
            if variant.id not in self.done:
                await self.finish(variant, cut, started.fork(), None)


async def run_port(emit: Emit, slot: SlotFactory, host: str, port: int, options: RelayOptions,
                   variants: tuple[Variant, ...] = VARIANTS) -> None:
    """Every variant on one port ends with exactly one emitted result, whatever the server does."""
    await _Port(emit, slot, host, port, options).run(variants)


class _Chunk:
    """Some variants of one port, tested over as few sessions as the server allows: reconnecting after a drop,
    retrying greylisted variants once, STARTTLS when required, without STARTTLS when its handshake fails."""

    def __init__(self, port: _Port, variants: tuple[Variant, ...]) -> None:
        self.port = port
        self.pending = list(variants)
        self.tags = {v.id: new_tag() for v in variants}  # one tag per variant, kept across a reconnect
        self.retries: dict[str, Transcript] = {}  # greylisted once: the transcript that the retry continues
        self.delays: list[float] = []
        self.reconnects = 0
        self.use_starttls = True

    async def run(self) -> None:
        while self.pending:
            async with self.port.slot():
                session = RelaySession(self.port.host, self.port.port, self.port.options, self.use_starttls)
                if await self._session(session):
                    return

    async def _session(self, session: RelaySession) -> bool:
        """One connection. True: the chunk is finished; False: reconnect."""
        try:
            self.port.greeted_by(await session.open())
            await self._variants(session)
        except Ended as exc:
            await session.conn.close(quit=False)
            await self._fail_all(exc.finding, session)
            return True
        except SmtpError as exc:
            await session.conn.close(quit=False)
            return await self._after(exc, session)
        await session.close()
        return True

    async def _variants(self, session: RelaySession) -> None:
        while self.pending:
            variant = self.pending[0]
            finding, transcript = await session.run_variant(variant, self.tags[variant.id],
                                                            self.retries.get(variant.id))
            # required but not offered in EHLO: try it anyway, then test this variant again
            if (finding.reason == "starttls_required" and not session.conn.tls and self.use_starttls
                    and not session.starttls_offered and await session.upgrade()):
                continue
            if finding.reason == "greylisted" and variant.id not in self.retries:
                await self._later(variant, finding, transcript)
                continue
            await self.port.finish(variant, finding, transcript, self.tags[variant.id])
            self.pending.pop(0)

    async def _later(self, variant: Variant, finding: Finding, transcript: Transcript) -> None:
        """Come back once with the same sender and recipient (greylisting remembers the triplet), after the other
        variants, waiting once for all of them."""
        self.retries[variant.id] = transcript
        self.delays.append(finding.retry_after or 0.0)
        self.pending.append(self.pending.pop(0))
        if all(v.id in self.retries for v in self.pending):
            delay = min(max(self.delays), self.port.options.greylist_max_wait)
            for v in self.pending:
                self.retries[v.id].info(f"temporary refusal: trying once more after {delay:g} s")
            await asyncio.sleep(delay)

    async def _after(self, exc: SmtpError, session: RelaySession) -> bool:
        """After the connection failed: True when the chunk is finished, False to reconnect."""
        if isinstance(exc, TlsFailed):
            return await self._after_tls(exc, session)
        reason = _ERROR_REASONS.get(type(exc), "protocol_error")
        if session.greeting is None:  # the greeting itself failed: nothing can be tested on this port
            await self._fail_all(Finding(Verdict.INCONCLUSIVE, reason, str(exc)), session)
            return True
        self.reconnects += 1
        if isinstance(exc, Dropped):
            session.conn.transcript.info(f"{exc}; reconnecting ({self.reconnects} of {MAX_RECONNECTS})")
            again = Finding(Verdict.INCONCLUSIVE, "dropped", f"the server dropped us {self.reconnects} times")
        else:  # a timeout or garbage in the middle of a variant: that variant ends here, the rest go on anew
            variant = self.pending.pop(0)
            await self.port.finish(variant, Finding(Verdict.INCONCLUSIVE, reason, str(exc)), session.conn.transcript,
                                   None)
            again = Finding(Verdict.INCONCLUSIVE, reason, f"{exc} (again)")
        if self.reconnects > MAX_RECONNECTS:
            await self._fail_all(again, session)
            return True
        return False

    async def _after_tls(self, exc: TlsFailed, session: RelaySession) -> bool:
        if self.use_starttls and session.greeting is None:
            self.use_starttls = False  # try once more without STARTTLS, as a client that cannot do TLS
            session.conn.transcript.info(f"{exc}; retrying without STARTTLS")
            return False
        await self._fail_all(Finding(Verdict.INCONCLUSIVE, "starttls_required", str(exc)), session)
        return True

    async def _fail_all(self, finding: Finding, session: RelaySession) -> None:
        for variant in self.pending:
            await self.port.finish(variant, finding, session.conn.transcript.fork(), None)
        self.pending.clear()
