"""What a result page says: one sentence per service, the rows with their guides, what changed since the previous
audit of the chain (fixed / still open / newly open), and when a re-test becomes possible."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from app.guides import GuideLibrary
from app.i18n import N_, _
from app.probes import describe_check, proxy_class
from app.store import Audit
from app.verdicts import NOT_ASKED, CheckResult, Verdict
from app.web.public import guides_for

SUMMARY_SENTENCES = {
    ("relay", "open"): N_("Your server is an open relay: anyone on the Internet can send mail through it. "
                       "A test message sent through it reached us."),
    ("relay", "open_unconfirmed"): N_("Your server accepted mail for a stranger's address through the end of the "
                                   "message. It has not reached us (yet): some servers accept and then discard such "
                                   "mail, but most relay it. Treat it as an open relay."),
    ("relay", "closed"): N_("We found no open relay."),
    ("relay", "inconclusive"): N_("We could not reach a final answer for the mail relay test:"),
    ("relay", "unreachable"): N_("No mail port answered, so your server cannot be an open relay from the Internet."),
    ("proxy", "open"): N_("Your server is an open proxy: anyone on the Internet can route traffic through it."),
    ("proxy", "closed"): N_("We found no open proxy."),
    ("proxy", "inconclusive"): N_("We could not reach a final answer for the proxy test:"),
    ("proxy", "unreachable"): N_("No proxy port answered, so your server cannot be an open proxy from the Internet."),
    ("blocklist", "listed"): N_("Public blocklists name your address: mail from it is refused where they are used. "
                             "Fix the cause first, then ask each list below for removal."),
    ("blocklist", "not_listed"): N_("None of the public blocklists we ask names your address."),
    ("blocklist", "inconclusive"): N_("Some blocklists could not give us an answer:"),
    ("blocklist", "unreachable"): N_("We could not ask the blocklists about any of the addresses."),
}
CHANGE_LABELS = {"fixed": N_("fixed"), "still_open": N_("still open"), "newly_open": N_("newly open"),
                 "delisted": N_("no longer listed"), "still_listed": N_("still listed"),
                 "newly_listed": N_("newly listed")}


def check_key(result: CheckResult) -> tuple[str, str, int, str]:
    return result.service, result.host, result.port, result.name


def _change(was: Verdict | None, now: Verdict, bad: Verdict, gone: str, still: str, new: str) -> str | None:
    """What happened to a finding (`bad`: open, or listed) between two audits; an uncertain answer now says
    nothing about whether it went away."""
    if was is bad and now is not bad and now not in (Verdict.INCONCLUSIVE, Verdict.ERROR):
        return gone
    if was is bad and now is bad:
        return still
    return new if now is bad else None


def changes_since(previous: Audit | None, current: Audit) -> dict[tuple[str, str, int, str], str]:
    """Per check of `current`: fixed (open before, not now), still_open, newly_open (open now, not before); a
    blocklist row: delisted (listed before, not now), still_listed, newly_listed."""
    if previous is None:
        return {}
    before = {check_key(c.result): c.result.verdict for c in previous.checks}
    changes: dict[tuple[str, str, int, str], str] = {}
    for stored in current.checks:
        key, now = check_key(stored.result), stored.result.verdict
        if stored.result.service == "blocklist":
            change = _change(before.get(key), now, Verdict.LISTED, "delisted", "still_listed", "newly_listed")
        else:
            change = _change(before.get(key), now, Verdict.OPEN, "fixed", "still_open", "newly_open")
        if change is not None:
            changes[key] = change
    return changes


@dataclass
class Report:
    audit: Audit
    rows: list[dict[str, Any]] = field(default_factory=list)
    sentences: dict[str, str] = field(default_factory=dict)
    why: dict[str, list[str]] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)  # counts per change kind
    retest_at: float | None = None  # inside the cooldown: when a re-test becomes possible


def build_report(audit: Audit, guides: GuideLibrary, previous: Audit | None, cooldown: float,
                 latest_of_target: float | None) -> Report:
    report = Report(audit)
    changes = changes_since(previous, audit)
    def order(stored: Any) -> tuple[Any, ...]:  # relay.v2 before relay.v10: by service, address, port, number
        r = stored.result
        prefix, _, number = r.name.rpartition(".v")
        return (r.service, r.host, r.port, prefix or r.name, int(number) if number.isdigit() else 0)

    for stored in sorted(audit.checks, key=order):
        result = stored.result
        change = changes.get(check_key(result), "")
        report.rows.append({"check": result, "guides": guides_for(stored, guides),  # matched when stored
                            "description": describe_check(result.name), "change": CHANGE_LABELS.get(change, ""),
                            "change_kind": change})
    for kind in changes.values():
        report.changes[kind] = report.changes.get(kind, 0) + 1
    for service in audit.services:
        report.sentences[service] = _sentence(audit, service)
        report.why[service] = sorted({c.result.reason for c in audit.checks if c.result.service == service
                                      and c.result.verdict in (Verdict.INCONCLUSIVE, Verdict.ERROR)
                                      and c.result.reason not in NOT_ASKED})
    if latest_of_target is not None and cooldown > 0 and latest_of_target + cooldown > time.time():
        report.retest_at = latest_of_target + cooldown
    return report


def _sentence(audit: Audit, service: str) -> str:
    verdict = (audit.summary or {}).get(service) or ""
    checks = [c.result for c in audit.checks if c.result.service == service]
    if verdict == "open" and service == "relay" and not any(r.confirmed for r in checks):
        verdict = "open_unconfirmed"
    text = SUMMARY_SENTENCES.get((service, verdict), "")
    sentence = _(text) if text else ""  # gettext("") would answer the catalogue's header
    if service == "proxy" and verdict == "open":
        classes = {proxy_class(r.name) for r in checks if r.verdict is Verdict.OPEN}
        if "smtp" in classes:
            sentence += " " + _("It lets strangers reach mail servers: spam can flow through it.")
        elif "tunnel" in classes:
            sentence += " " + _("It opens encrypted tunnels (port 443) for strangers.")
    return sentence
