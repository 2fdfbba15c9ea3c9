"""The result page's evidence, one block per address and port, and the one next step per service.

A port where nothing was found to do (every check closed, login required or unreachable) is one line; checks with
the same verdict and reason collapse into one line ("22 of 22 relay attempts refused") that opens onto the rows;
open checks stand alone, the dialogue lines that prove them first. Rows are build_report's: {"check": CheckResult,
"guides": [Guide, ...], ...}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.guides import FIX_ANCHOR, Guide
from app.i18n import N_, _, ngettext
from app.verdicts import PROBED, REASONS, SERVICES, CheckResult, TranscriptLine, Verdict, summarize

QUIET = (Verdict.CLOSED, Verdict.AUTH_REQUIRED, Verdict.UNREACHABLE)
# reasons for which the port never got to hear a check: the whole port is one plain sentence
PORT_LINES = {
    "refused": N_("nothing listens — nothing to do"),
    "filtered": N_("no answer, probably a firewall — nothing to do if you block it on purpose"),
    "forbidden_address": N_("not tested: a private or reserved address"),
    "host_limit": N_("not tested in this run: we test only a domain's first addresses"),
}
# what the checks of one group met, in a few words (else the reason's own explanation)
OUTCOMES = {
    "delivered": N_("relayed, and the message reached us"),
    "accepted_unconfirmed": N_("accepted for a stranger's address"),
    "accepts_then_rejects": N_("accepted at first, then refused"),
    "relay_denied": N_("refused"),
    "greylisted": N_("asked to come back later (greylisting)"),
    "auth_required_for_relay": N_("login required"),
    "sender_rejected": N_("our sender refused"),
    "accepted_as_local": N_("kept for local delivery: not relaying"),
    "sender_form_refused": N_("refused at the sender"),
    "token_returned": N_("passed our secret test page through"),
    "auth_required": N_("login required"),
    "destination_denied": N_("refused"),
    "answers_without_tunnel": N_("answered, but passed nothing through"),
    "not_a_proxy": N_("answered, but not as a proxy"),
    "timeout": N_("stopped answering"),
    "refused": N_("nothing listens"),
    "filtered": N_("no answer"),
}
EVIDENCE_LINES = 12  # at most, per open check: the rest is in the full dialogue


@dataclass
class Group:
    """Checks of one port with the same verdict and reason: one line, opening onto the rows."""

    verdict: str
    reason: str
    rows: list[dict[str, Any]]
    line: str


@dataclass
class Block:
    service: str
    host: str
    port: int
    verdict: str  # the port's own summary (DESIGN.md's rule over its checks)
    quiet: bool  # nothing open, nothing uncertain: the whole port is `line`
    line: str
    open_rows: list[dict[str, Any]] = field(default_factory=list)  # each with "evidence": the lines that prove it
    groups: list[Group] = field(default_factory=list)
    guides: list[Guide] = field(default_factory=list)  # the open checks' guides, each once, best first

    @property
    def total(self) -> int:
        return len(self.open_rows) + sum(len(g.rows) for g in self.groups)


@dataclass(frozen=True)
class NextStep:
    """What the owner of an open service does now: the product guide's Fix, or the general guide."""

    guide: Guide
    product: str  # "" when the software is unknown
    steps: int | None  # the guide's sections from Fix on (Fix, Reload, Verify, Re-test)


def blocks(rows: list[dict[str, Any]]) -> list[Block]:
    """One block per (service, address, port): relay, then proxy; open or uncertain ports first, else in the
    rows' order."""
    by_port: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        check: CheckResult = row["check"]
        if check.service not in PROBED:  # blocklist rows have their own section (app/web/listings.py)
            continue
        by_port.setdefault((check.service, check.host, check.port), []).append(row)
    made = [_block(service, host, port, port_rows) for (service, host, port), port_rows in by_port.items()]
    # relay before proxy, and within a service the ports with something to do first
    return sorted(made, key=lambda b: (SERVICES.index(b.service) if b.service in SERVICES else 9, b.quiet))


def _block(service: str, host: str, port: int, rows: list[dict[str, Any]]) -> Block:
    verdict = summarize((r["check"].verdict, r["check"].reason) for r in rows).value
    open_rows = [{**r, "evidence": evidence(r["check"])} for r in rows if r["check"].verdict is Verdict.OPEN]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        check = row["check"]
        if check.verdict is not Verdict.OPEN:
            groups.setdefault((check.verdict.value, check.reason), []).append(row)
    made = [Group(v, reason, members, group_line(service, reason, len(members), len(rows)))
            for (v, reason), members in groups.items()]
    made.sort(key=lambda g: (g.verdict not in ("inconclusive", "error"), -len(g.rows)))  # uncertain ones first
    quiet = all(r["check"].verdict in QUIET for r in rows)
    guides: list[Guide] = []
    for row in open_rows:
        guides.extend(g for g in row["guides"] if g not in guides)
    return Block(service, host, port, verdict, quiet, _port_line(made, len(rows)) if quiet else "",
                 open_rows, made, guides)


def group_line(service: str, reason: str, count: int, total: int) -> str:
    """"22 of 22 relay attempts refused": how many checks of the port met this outcome."""
    if service == "proxy":
        counted = ngettext("%(count)s of %(num)s proxy attempt", "%(count)s of %(num)s proxy attempts", total)
    else:
        counted = ngettext("%(count)s of %(num)s relay attempt", "%(count)s of %(num)s relay attempts", total)
    counted %= {"count": count, "num": total}
    outcome = OUTCOMES.get(reason)
    return f"{counted} {_(outcome)}" if outcome else f"{counted}: {_(REASONS[reason].explanation)}"


def _port_line(groups: list[Group], total: int) -> str:
    """The one line of a port with nothing to do."""
    if len(groups) == 1:
        reason = groups[0].reason
        if reason in PORT_LINES:
            return _(PORT_LINES[reason])
        return f"{groups[0].line} — {_(REASONS[reason].next_step)}"
    return _("closed: none of the %(num)s attempts went through — nothing to do") % {"num": total}


def evidence(check: CheckResult, limit: int = EVIDENCE_LINES) -> list[TranscriptLine]:
    """The dialogue lines that prove an open check: who answered (the greeting of a shared opening), then what was
    said in this check itself, without our own notes or blank lines; a long exchange keeps its start and its end
    (the proof)."""
    said = [line for line in check.own_lines if line.dir in ("in", "out") and line.text.strip()]
    greeting = [next((line for line in check.opening.lines if line.dir == "in"), None)] if check.opening else []
    lines = [line for line in greeting if line is not None] + said
    if len(lines) <= limit:
        return lines
    head = limit // 4
    return [*lines[:head], TranscriptLine(lines[head].t, "info", "…"), *lines[len(lines) - (limit - head):]]


def next_step(rows: list[dict[str, Any]], service: str) -> NextStep | None:
    """For an open service: the first product guide among its open checks' guides, else the first general one."""
    guides: list[Guide] = []
    for row in rows:
        if row["check"].service == service and row["check"].verdict is Verdict.OPEN:
            guides.extend(g for g in row["guides"] if g not in guides)
    product = next((g for g in guides if g.service != "general"), None)
    if product is not None:
        return NextStep(product, product.title.split(":", 1)[0].strip(), fix_steps(product))
    return NextStep(guides[0], "", None) if guides else None


def fix_steps(guide: Guide) -> int | None:
    """How many of the guide's sections the owner follows from Fix on (Fix, Reload, Verify, Re-test)."""
    sections = [anchor for level, anchor, _text in guide.toc if level == 2]
    return len(sections) - sections.index(FIX_ANCHOR) if FIX_ANCHOR in sections else None
