"""The result page's blocklist section (issue 17): which lists name which address and why, what our own relay and
proxy verdicts explain, the way off each list in the order that helps, and the listings a re-test saw go away.

Rows are build_report's ({"check": CheckResult, "change": label, "change_kind": kind, ...}); the lists' facts come
from the blocklists file (app/probes/blocklist.py), by the row's list id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.i18n import N_, _
from app.probes.blocklist import Blocklist, Code
from app.verdicts import Verdict

OUR_FINDINGS = {"relay": N_("an open mail relay"), "proxy": N_("an open proxy")}


@dataclass
class Listing:
    """One list naming one address."""

    row: dict[str, Any]
    blocklist: Blocklist | None  # None: a list no longer in the file (an older audit)
    codes: list[tuple[str, Code | None]]
    explained_by: list[str]  # our open services that explain the listing ("relay", "proxy")

    @property
    def name(self) -> str:
        return self.blocklist.name if self.blocklist is not None else self.row["check"].name

    @property
    def removal_url(self) -> str:
        data = self.row["check"].data or {}
        return str(data.get("removal_url") or (self.blocklist.removal_url if self.blocklist else ""))

    @property
    def txt(self) -> list[str]:
        return [str(t) for t in (self.row["check"].data or {}).get("txt", [])]


@dataclass
class Section:
    listed: list[Listing] = field(default_factory=list)  # in the order that helps (see order())
    clear: list[dict[str, Any]] = field(default_factory=list)  # not listed
    unsure: list[dict[str, Any]] = field(default_factory=list)  # inconclusive or error (IPv6 not asked: not here)
    not_asked: list[dict[str, Any]] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)  # listed in the previous test, no longer

    @property
    def empty(self) -> bool:
        return not (self.listed or self.clear or self.unsure or self.not_asked)


def _listing(row: dict[str, Any], lists: Mapping[str, Blocklist], open_services: set[str]) -> Listing:
    check = row["check"]
    blocklist = lists.get(check.name.removeprefix("blocklist."))
    codes = [(str(c), blocklist.code(str(c)) if blocklist else None) for c in (check.data or {}).get("codes", [])]
    explained = sorted({s for _, code in codes if code is not None for s in code.explained_by} & open_services)
    return Listing(row, blocklist, codes, explained)


def order(listing: Listing) -> tuple[int, int, str]:
    """The way off, in the order that helps: listings our own findings explain first (fix that, re-test, then
    ask), then lists that need a request, then those that remove by themselves."""
    automatic = listing.blocklist.automatic_removal if listing.blocklist else False
    return (0 if listing.explained_by else 1, 1 if automatic else 0, listing.name.lower())


def section(rows: Sequence[dict[str, Any]], lists: Sequence[Blocklist], summary: Mapping[str, Any]) -> Section:
    """The blocklist rows of a finished audit, sorted into the section's parts."""
    by_id = {b.id: b for b in lists}
    open_services = {s for s in ("relay", "proxy") if summary.get(s) == "open"}
    made = Section()
    for row in rows:
        check = row["check"]
        if check.service != "blocklist":
            continue
        if row.get("change_kind") == "delisted":
            made.gone.append(row)
        if check.verdict is Verdict.LISTED:
            made.listed.append(_listing(row, by_id, open_services))
        elif check.verdict is Verdict.NOT_LISTED:
            made.clear.append(row)
        elif check.reason == "ipv6_not_queried":
            made.not_asked.append(row)
        else:  # could not answer, or an address that was not asked about (forbidden_address, host_limit)
            made.unsure.append(row)
    made.listed.sort(key=order)
    return made


def explained_text(listing: Listing) -> str:
    """'an open proxy': what our own test found that explains the listing, in the visitor's language."""
    return ", ".join(_(OUR_FINDINGS[s]) for s in listing.explained_by)
