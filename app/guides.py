"""Guides: Markdown files under guides/ with YAML front matter, rendered safely, matched to findings.

Raw HTML in a guide is not rendered (markdown-it's `html` option is off), so a guide cannot inject markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt

from app.verdicts import CheckResult, Verdict

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
SERVICES = ("relay", "proxy", "general")


@dataclass(frozen=True)
class Guide:
    slug: str
    title: str
    service: str
    body: str
    products: list[str] = field(default_factory=list)
    versions: str = ""
    fingerprints: list[re.Pattern[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    updated: str = ""
    path: str = ""

    def matches(self, text: str) -> bool:
        return any(p.search(text) for p in self.fingerprints)


class GuideError(ValueError):
    pass


def parse_guide(text: str, path: str = "") -> Guide:
    if not text.startswith("---\n"):
        raise GuideError(f"{path}: no front matter")
    try:
        _, front, body = text.split("---\n", 2)
    except ValueError:
        raise GuideError(f"{path}: front matter not closed") from None
    meta: dict[str, Any] = yaml.safe_load(front) or {}
    for key in ("slug", "title", "service"):
        if not meta.get(key):
            raise GuideError(f"{path}: front matter lacks {key!r}")
    if not SLUG.match(str(meta["slug"])):
        raise GuideError(f"{path}: bad slug {meta['slug']!r}")
    if meta["service"] not in SERVICES:
        raise GuideError(f"{path}: service must be one of {SERVICES}")
    sources = [str(s) for s in meta.get("sources") or []]
    if any(not s.startswith(("https://", "http://")) for s in sources):
        raise GuideError(f"{path}: every source must be an http(s) address")
    return Guide(
        slug=str(meta["slug"]), title=str(meta["title"]), service=str(meta["service"]), body=body,
        products=[str(p) for p in meta.get("products") or []], versions=str(meta.get("versions") or ""),
        fingerprints=[re.compile(str(p), re.IGNORECASE) for p in meta.get("fingerprints") or []],
        sources=sources, updated=str(meta.get("updated") or ""), path=path,
    )


class GuideLibrary:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.guides: dict[str, Guide] = {}
        self._md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
        for file in sorted(root.glob("*/*.md")):
            guide = parse_guide(file.read_text(encoding="utf-8"), str(file.relative_to(root)))
            if guide.slug in self.guides:
                raise GuideError(f"duplicate slug {guide.slug!r}")
            self.guides[guide.slug] = guide

    def get(self, slug: str) -> Guide | None:
        return self.guides.get(slug)

    def all(self) -> list[Guide]:
        return sorted(self.guides.values(), key=lambda g: (SERVICES.index(g.service), g.title.lower()))

    def render(self, guide: Guide) -> str:
        return self._md.render(guide.body)

    def for_check(self, result: CheckResult) -> list[Guide]:
        """Product guides whose fingerprints match the evidence; the service's general guide for an open finding."""
        evidence = _evidence_text(result)
        found = [g for g in self.all() if g.service == result.service and evidence and g.matches(evidence)]
        if not found and result.verdict is Verdict.OPEN:
            # an open proxy that names no product: most likely malware, not software someone installed
            unknown = result.service == "proxy" and not (result.fingerprint or {}).get("product")
            wanted = "unknown-proxy" if unknown else result.service
            found = [g for g in self.all() if g.service == "general" and wanted in g.products]
            if unknown:
                found += [g for g in self.all() if g.service == "general" and "proxy" in g.products]
        return found


def _evidence_text(result: CheckResult) -> str:
    parts = []
    if result.fingerprint:
        parts.extend(str(v) for v in result.fingerprint.values() if v)
    parts.extend(line.text for line in result.transcript if line.dir == "in")
    return "\n".join(parts)
