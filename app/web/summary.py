"""The result as plain text, for the owner to paste into an email to their provider or the agency: address, date,
engine version, the verdict per service with its next step, the evidence of each open port, one line per port,
and the permalink. Remote text (banners, dialogue) is hostile: no control or direction characters, bounded lines,
a bounded whole."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Callable, Mapping

from app.i18n import _, ngettext
from app.web.blocks import Block, NextStep
from app.web.listings import Section
from app.web.listings import explained_text as explained
from app.web.report import Report

# C0, DEL and C1 controls, and the Unicode characters that reorder or break lines when the text is shown
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
LINE_MAX = 200
TEXT_MAX = 16_000
ARROWS = {"out": "->", "in": "<-"}
SERVICE_NAMES = {"relay": "Mail relay", "proxy": "Proxy", "blocklist": "Blocklists"}


def clean(text: str, limit: int = LINE_MAX) -> str:
    """One safe line: every control or direction character becomes '?', and the line is cut at `limit`."""
    text = UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _utc(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp)) if timestamp else "-"


def summary_text(report: Report, port_blocks: list[Block], steps: Mapping[str, NextStep | None], permalink: str,
                 link: Callable[[str], str], names: Mapping[str, str], lists: Section | None = None) -> str:
    """`link`: a site path made absolute; `names`: verdict -> its name in the visitor's language; `lists`: the
    blocklist section (app/web/listings.py)."""
    audit = report.audit
    lines = [_("Secure Your Server: test result"), _("Permalink:") + " " + permalink,
             _("Address:") + " " + clean(", ".join(audit.hosts)),
             _("Started:") + " " + _utc(audit.created_at) + " · " + _("Finished:") + " " + _utc(audit.finished_at),
             _("Test engine:") + " " + clean(audit.engine_version), ""]
    for service in audit.services:
        verdict = (audit.summary or {}).get(service) or ""
        lines.append(f"{_(SERVICE_NAMES.get(service, service))}: {names.get(verdict, verdict).upper()}")
        if report.sentences.get(service):
            lines += _wrap(report.sentences[service])
        step = steps.get(service)
        if step is not None:
            lines += _wrap(_("Next step:") + " " + step_text(step) + " " + link(step_path(step)))
        lines.append("")
    if report.changes:
        lines += [_("Since the previous test:") + " " + changes_text(report.changes), ""]
    lines += _evidence(port_blocks)
    lines += _listings(lists) if lists is not None else []
    lines.append(_("Every port tested:"))
    lines += [f"- {b.host} {_('port')} {b.port} ({_(SERVICE_NAMES.get(b.service, b.service))}): {port_text(b)}"
              for b in port_blocks]
    lines += ["", _("See the full result, with every dialogue:") + " " + permalink]
    return _bounded("\n".join(lines) + "\n", permalink)


def _listings(lists: Section) -> list[str]:
    """Each listing with its codes and its removal page; the listings gone since the previous test; the lists
    that do not name the address, by name."""
    lines: list[str] = []
    for listing in lists.listed:
        check = listing.row["check"]
        codes = ", ".join(f"{answer} ({code.part})" if code else answer for answer, code in listing.codes)
        lines.append(_("Listed by %(list)s: %(host)s, %(codes)s") % {"list": clean(listing.name), "host": check.host,
                                                                   "codes": clean(codes)})
        lines += [f"  {clean(text)}" for text in listing.txt[:2]]
        if listing.explained_by:
            lines.append("  " + _("Our test found %(what)s, which explains this listing: fix it first.")
                         % {"what": explained(listing)})
        lines.append("  " + _("Removal:") + " " + clean(listing.removal_url))
    for row in lists.gone:
        lines.append(_("No longer listed since the previous test: %(name)s, %(host)s")
                     % {"name": row["check"].name, "host": row["check"].host})
    if lists.clear:
        names = sorted({row["check"].name.removeprefix("blocklist.") for row in lists.clear})
        lines.append(_("Not listed by:") + " " + ", ".join(names))
    return [*lines, ""] if lines else []


def _wrap(text: str) -> list[str]:
    """Our own sentences, wrapped for an email (links are never cut)."""
    return textwrap.wrap(text, 76, break_long_words=False, break_on_hyphens=False)


def _evidence(port_blocks: list[Block]) -> list[str]:
    """Per open port: the first open check's proof; the port's other open checks by name."""
    lines: list[str] = []
    for block in port_blocks:
        if not block.open_rows:
            continue
        first = block.open_rows[0]
        check = first["check"]
        lines.append(_("Evidence, %(host)s port %(port)s, check %(name)s (%(reason)s):")
                     % {"host": block.host, "port": block.port, "name": check.name, "reason": check.reason})
        lines += [f"  {ARROWS.get(line.dir, ' ')} {clean(line.text)}" for line in first["evidence"]]
        others = [row["check"].name for row in block.open_rows[1:]]
        if others:
            lines.append("  " + _("Also open on this port:") + " " + ", ".join(others))
        lines.append("")
    return lines


def step_text(step: NextStep) -> str:
    if not step.product:
        return _("we could not tell which software answers: start with this guide:")
    if step.steps:
        return ngettext("Your server is %(product)s: follow this step",
                        "Your server is %(product)s: follow these %(num)s steps", step.steps) % {
            "product": step.product, "num": step.steps}
    return _("Your server is %(product)s: follow its guide") % {"product": step.product}


def step_path(step: NextStep) -> str:
    from app.guides import FIX_ANCHOR, guide_url

    return guide_url(step.guide, FIX_ANCHOR if step.product else "")


def changes_text(changes: Mapping[str, int]) -> str:
    labels = {"fixed": _("%(num)s fixed"), "still_open": _("%(num)s still open"),
              "newly_open": _("%(num)s newly open")}
    return ", ".join(labels[kind] % {"num": n} for kind, n in changes.items() if kind in labels)


def port_text(block: Block) -> str:
    if block.quiet:
        return block.line
    parts = [g.line for g in block.groups]
    if block.open_rows:
        parts.insert(0, _("open: %(names)s") % {"names": ", ".join(r["check"].name for r in block.open_rows)})
    return "; ".join(parts)


def _bounded(text: str, permalink: str) -> str:
    if len(text) <= TEXT_MAX:
        return text
    return text[:TEXT_MAX] + "\n…\n" + _("Cut here; the full result:") + " " + permalink + "\n"
