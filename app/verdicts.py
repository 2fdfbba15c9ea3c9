"""The vocabulary of the whole house: verdicts, reason codes with their texts, check results, the summary rule.

Pages, API, CLI and store all render from here; a reason code is never renamed, only added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from app.i18n import N_


class Verdict(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    AUTH_REQUIRED = "auth_required"
    INCONCLUSIVE = "inconclusive"
    UNREACHABLE = "unreachable"
    ERROR = "error"
    # blocklist rows: what a public blocklist answered about the address
    LISTED = "listed"
    NOT_LISTED = "not_listed"


SERVICES = ("relay", "proxy", "blocklist")
PROBED = ("relay", "proxy")  # the services that connect to the server (the blocklist service asks DNS only)


@dataclass(frozen=True)
class Reason:
    code: str
    services: tuple[str, ...]
    explanation: str  # what happened, in plain words
    next_step: str  # what the visitor can do about it


_REASONS = [
    # relay
    Reason("delivered", ("relay",),
           N_("Your server accepted a message for a stranger's address and delivered it to us."),
           N_("Your server is an open relay. Follow the guide for your mail server, then re-test.")),
    Reason("accepted_unconfirmed", ("relay",),
           N_("Your server accepted a message for a stranger's address through the end of the message, but it has not "
           "reached us (yet). Some servers accept and then silently discard such mail; most deliver it."),
           N_("Treat this as an open relay: check your relay settings with the guide, then re-test.")),
    Reason("accepts_then_rejects", ("relay",),
           N_("Your server accepted the recipient at first but refused the message itself."),
           N_("Nothing was relayed. Rejecting earlier (at RCPT) is cleaner, but this is not an open relay.")),
    Reason("relay_denied", ("relay",), N_("Your server refused to relay mail for a stranger's address."),
           N_("Nothing to do: this is what a closed relay does.")),
    Reason("greylisted", ("relay",), N_("Your server asked us to come back later (greylisting)."),
           N_("Re-test in a few minutes; greylisting lets the second attempt through.")),
    Reason("auth_required_for_relay", ("relay",), N_("Your server relays only for users who log in."),
           N_("Nothing to do, as long as passwords are strong.")),
    Reason("starttls_required", ("relay",), N_("Your server insisted on encryption and we could not start it."),
           N_("Check the server's TLS certificate and settings, then re-test.")),
    Reason("sender_rejected", ("relay",),
           N_("Your server refused our sender address, so this variant could not be tried."),
           N_("Nothing to do for this variant; the other variants still test relaying.")),
    Reason("accepted_as_local", ("relay",),
           N_("Your server accepted a message for an address at the server itself (its own name or address, or no "
           "domain at all), and it did not reach us: the server kept it for local delivery instead of relaying it."),
           N_("Nothing to do: this is not relaying. If you do not want odd addresses accepted, refuse unknown local "
           "users.")),
    Reason("sender_form_refused", ("relay",),
           N_("Your server refused the sender address of this variant, while it accepts our ordinary sender: it does "
           "not relay mail sent with this kind of sender."),
           N_("Nothing to do: refusing such senders is what a careful server does.")),
    Reason("client_blocked", ("relay",), N_("Your server refused to talk to our test address at all."),
           N_("If you block us on purpose, no verdict is possible: allow our address for one test, or test from "
           "another address.")),
    # proxy
    Reason("token_returned", ("proxy",),
           N_("Your server fetched our secret test page for a stranger and passed its contents back."),
           N_("Your server is an open proxy. Follow the guide for your proxy software, then re-test.")),
    Reason("auth_required", ("proxy",), N_("Your proxy asks for a user name and password."),
           N_("Nothing to do, as long as passwords are strong.")),
    Reason("destination_denied", ("proxy",), N_("Your proxy refused to connect us to our test server."),
           N_("Nothing to do: this is what a closed proxy does.")),
    Reason("answers_without_tunnel", ("proxy",),
           N_("The port answered, but did not pass our secret test page through (for example an ordinary web server)."),
           N_("Nothing to do: this is not an open proxy.")),
    Reason("not_a_proxy", ("proxy",), N_("The port answered, but not as a proxy."), N_("Nothing to do.")),
    Reason("destination_unreachable", ("proxy",),
           N_("Your proxy accepted the request but could not reach our test server."),
           N_("A firewall may block it on the way out. Re-test; if it persists, check the proxy's access rules.")),
    Reason("answer_not_returned", ("proxy",),
           N_("Your proxy passed our request on to our test server (it saw the request arrive), but the answer did "
           "not come back through the proxy."),
           N_("Your proxy forwards requests for strangers: follow the guide for your proxy software, then re-test.")),
    # both
    Reason("timeout", ("relay", "proxy"), N_("Your server stopped answering in the middle of the test."),
           N_("It may be slow or tarpitting us. Re-test later; if it persists, check its logs for our address.")),
    Reason("refused", ("relay", "proxy"), N_("Nothing listens on this port (the connection was refused)."),
           N_("Nothing to do: a closed port can be neither a relay nor a proxy.")),
    Reason("filtered", ("relay", "proxy"), N_("The port did not answer at all (probably a firewall drops it)."),
           N_("Nothing to do if you block it on purpose. If the service should be reachable, check the firewall.")),
    Reason("forbidden_address", ("relay", "proxy", "blocklist"),
           N_("This address is private or reserved, so we do not test it."),
           N_("Test a public address of your server.")),
    Reason("host_limit", ("relay", "proxy", "blocklist"),
           N_("We test only the first addresses of a domain in one test, and this one was not among them."),
           N_("Run the test from this server itself (your own address), or re-test once the others are fixed.")),
    Reason("internal_error", ("relay", "proxy", "blocklist"), N_("Our test failed for a reason on our side."),
           N_("Re-test in a few minutes; if it persists, write to us.")),
    Reason("port_open", ("relay", "proxy"),
           N_("The port accepts connections. This version of the site checks reachability only, so it cannot tell "
           "yet whether the port is an open relay or proxy."),
           N_("Keep the port closed if you do not need it; the full relay and proxy checks will tell more.")),
    Reason("not_smtp", ("relay",), N_("The port answered, but not as a mail server."),
           N_("Nothing to do: a port that does not speak SMTP cannot relay mail.")),
    Reason("protocol_error", ("relay", "proxy"),
           N_("Your server answered with something that does not follow the protocol, so we stopped."),
           N_("Check what really listens on this port (a firewall or filter may be in the way), then re-test.")),
    Reason("dropped", ("relay", "proxy"), N_("Your server kept closing the connection in the middle of the test."),
           N_("It may limit how many connections or errors it accepts from one address. Re-test later.")),
    Reason("audit_deadline", ("relay", "proxy", "blocklist"),
           N_("The test ran out of time before this check finished."),
           N_("Re-test; if it happens again, your server may be slowing us down on purpose.")),
    # blocklist (issue 17): what a list's answer means; the list's own meaning of its code is in the row
    Reason("listed_spam", ("blocklist",),
           N_("This list names your address as a source of spam (mail reached its traps or its users' reports)."),
           N_("Find what sent the mail (an open relay, a hacked account or form), stop it, re-test here, then ask the "
           "list for removal.")),
    Reason("listed_exploited", ("blocklist",),
           N_("This list names your address as an exploited or infected machine: an open proxy, malware or a "
           "hacked device sent traffic from it."),
           N_("Close the open proxy or clean the infected machine first, re-test here, then ask the list for "
           "removal.")),
    Reason("listed_proxy", ("blocklist",),
           N_("This list names your address as an open proxy that strangers used."),
           N_("Close the proxy (see the proxy result above), re-test here, then ask the list for removal.")),
    Reason("listed_policy", ("blocklist",),
           N_("This list names your address as part of a range that should not send mail directly (a dynamic or "
           "end-user range). This is a policy, not a finding of abuse."),
           N_("If this server sends mail itself, ask your provider for a static address with a proper name, or send "
           "through your provider's mail server; the list's page explains the exception.")),
    Reason("listed_reputation", ("blocklist",),
           N_("This list gives your address a poor sending reputation, from the mail it saw come from it."),
           N_("Find what sent the unwanted mail and stop it; the listing fades or can be removed once mail is clean.")),
    Reason("listed_other", ("blocklist",),
           N_("This list names your address, with an answer code it does not document for us."),
           N_("Look the address up on the list's own page to see why.")),
    Reason("not_listed", ("blocklist",), N_("This list does not name your address."), N_("Nothing to do.")),
    Reason("list_refused_query", ("blocklist",),
           N_("This list refuses queries from our resolver (for example a public or a busy resolver), so its answer "
           "says nothing about your address."),
           N_("Look the address up on the list's own page. The site's operator can point SECURE_DNS_SERVERS at a "
           "resolver the list accepts.")),
    Reason("list_timeout", ("blocklist",), N_("The list did not answer in time."),
           N_("Re-test later, or look the address up on the list's own page.")),
    Reason("list_failed", ("blocklist",),
           N_("The list's DNS servers failed to answer (an error such as SERVFAIL)."),
           N_("Re-test later, or look the address up on the list's own page.")),
    Reason("list_bad_answer", ("blocklist",),
           N_("The list answered with an address outside 127.0.0.0/8, which no list uses to name an address: the "
           "list may be shut down or answering everything."),
           N_("Nothing to do on your side; look the address up on the list's own page.")),
    Reason("ipv6_not_queried", ("blocklist",),
           N_("This list does not publish IPv6 addresses, so we did not ask it about this one."),
           N_("Nothing to do.")),
]

# a blocklist row that says nothing about the address and is no failure either: left out of the service summary
NOT_ASKED = ("ipv6_not_queried",)

REASONS: dict[str, Reason] = {r.code: r for r in _REASONS}


@dataclass
class TranscriptLine:
    t: float  # seconds since the check started
    dir: str  # "out" (we sent), "in" (we received), "info" (what happened)
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "dir": self.dir, "text": self.text}


class Opening:
    """The shared beginning of several checks' transcripts: a relay session's connect, greeting, EHLO and STARTTLS,
    which every variant tested on that connection shows first. Stored once per audit and referenced by its rows;
    `key` is unique within an audit. The lines are shared objects, never copied per row."""

    __slots__ = ("_dicts", "key", "lines")

    def __init__(self, key: str, lines: Iterable[TranscriptLine]) -> None:
        self.key = key
        self.lines: tuple[TranscriptLine, ...] = tuple(lines)
        self._dicts: list[dict[str, Any]] | None = None

    def dicts(self) -> list[dict[str, Any]]:
        """The lines as JSON objects, made once and shared by every row that shows this opening (read-only)."""
        if self._dicts is None:
            self._dicts = [line.to_dict() for line in self.lines]
        return self._dicts

    def __repr__(self) -> str:
        return f"Opening({self.key!r}, {len(self.lines)} lines)"


@dataclass
class CheckResult:
    service: str
    host: str
    port: int
    name: str  # stable id "service.check", e.g. relay.v12
    verdict: Verdict
    reason: str
    confirmed: bool = False
    fingerprint: dict[str, Any] | None = None
    transcript: list[TranscriptLine] = field(default_factory=list)
    detail: str = ""
    tag: str | None = None  # the proof tag of a relayed message we wait for at our sink
    # public facts of the row beyond the common fields (a blocklist row's list, return codes, TXT text and removal
    # page); JSON types only; None for relay and proxy rows
    data: dict[str, Any] | None = None
    # internal, never in the public JSON: the shared beginning of `transcript`, whose first len(opening.lines)
    # lines are opening.lines; None: every line is the check's own
    opening: Opening | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")
        self.verdict = Verdict(self.verdict)
        if self.opening is not None and not _starts_with(self.transcript, self.opening.lines):
            raise ValueError("a check's transcript must begin with the opening it references")

    @property
    def own_lines(self) -> list[TranscriptLine]:
        """The lines after the shared opening (all lines when there is none)."""
        return self.transcript[len(self.opening.lines):] if self.opening is not None else self.transcript

    def to_dict(self) -> dict[str, Any]:
        """The stored and streamed form: the public fields (README's API) plus the internal `tag`, which the web
        layer drops from every public answer; `opening` stays out. A shared opening's line objects are the same in
        every row that shows it: no copy per row."""
        opening = self.opening.dicts() if self.opening is not None else []
        return {
            "service": self.service, "host": self.host, "port": self.port, "name": self.name,
            "verdict": self.verdict.value, "reason": self.reason, "confirmed": self.confirmed,
            "fingerprint": dict(self.fingerprint) if self.fingerprint is not None else None,
            "transcript": [*opening, *(line.to_dict() for line in self.own_lines)],
            "detail": self.detail, "tag": self.tag, "data": dict(self.data) if self.data is not None else None,
        }


def _starts_with(lines: list[TranscriptLine], prefix: tuple[TranscriptLine, ...]) -> bool:
    return len(lines) >= len(prefix) and all(a is b or a == b for a, b in zip(lines, prefix, strict=False))


def escape_bytes(data: bytes, limit: int = 2000) -> str:
    """Render remote bytes as printable text: non-printable bytes become \\xNN; long input is cut and marked."""
    cut = data[:limit]
    out = []
    for byte in cut:
        ch = chr(byte)
        if ch in "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t" or 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    if len(data) > limit:
        out.append(f"... [{len(data) - limit} more bytes]")
    return "".join(out)


def summarize(verdicts: Iterable[tuple[Verdict | str, str]]) -> Verdict:
    """DESIGN.md's summary rule for one service, from its checks' (verdict, reason) pairs."""
    pairs = [(Verdict(v), r) for v, r in verdicts]
    if any(v is Verdict.OPEN for v, _ in pairs):
        return Verdict.OPEN
    if any(v in (Verdict.INCONCLUSIVE, Verdict.ERROR) and r != "sender_rejected" for v, r in pairs):
        return Verdict.INCONCLUSIVE
    if any(v in (Verdict.CLOSED, Verdict.AUTH_REQUIRED) for v, _ in pairs):
        return Verdict.CLOSED
    return Verdict.UNREACHABLE


def summarize_blocklist(verdicts: Iterable[tuple[Verdict | str, str]]) -> Verdict:
    """The blocklist service's rule: `listed` if any list names the address; else `inconclusive` if any list could
    not answer (a timeout, a failure, a refused query, an error of ours); else `not_listed` if any list answered;
    else `unreachable` (every address was refused by the guard). Lists that were not asked (IPv6) do not count."""
    pairs = [(Verdict(v), r) for v, r in verdicts if r not in NOT_ASKED]
    if any(v is Verdict.LISTED for v, _ in pairs):
        return Verdict.LISTED
    if any(v in (Verdict.INCONCLUSIVE, Verdict.ERROR) for v, _ in pairs):
        return Verdict.INCONCLUSIVE
    if any(v is Verdict.NOT_LISTED for v, _ in pairs):
        return Verdict.NOT_LISTED
    return Verdict.UNREACHABLE


def summarize_service(service: str, verdicts: Iterable[tuple[Verdict | str, str]]) -> Verdict:
    """The summary rule of one service (DESIGN.md): the blocklist service has its own."""
    return summarize_blocklist(verdicts) if service == "blocklist" else summarize(verdicts)


def summarize_audit(results: Iterable[tuple[str, Verdict | str, str]],
                    services: Iterable[str]) -> dict[str, str | None]:
    """Summary per service: None for a service that was not requested."""
    requested = set(services)
    by_service: dict[str, list[tuple[Verdict | str, str]]] = {s: [] for s in SERVICES}
    for service, verdict, reason in results:
        by_service.setdefault(service, []).append((verdict, reason))
    return {s: (summarize_service(s, by_service[s]).value if s in requested else None) for s in SERVICES}
