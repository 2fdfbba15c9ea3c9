"""Guides: Markdown files under guides/ with YAML front matter, rendered safely, checked, matched to findings.

Raw HTML in a guide is not rendered (markdown-it's `html` option is off), so a guide cannot inject markup. Code is
highlighted on the server with Pygments (class names only: the CSP allows no inline style). Every guide is parsed,
checked and rendered once, when the library loads.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token
from mdit_py_plugins.anchors import anchors_plugin
from pygments import highlight as pygments_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from app.i18n import N_
from app.verdicts import CheckResult, Verdict

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
SERVICES = ("relay", "proxy", "general")
PRODUCT_SECTIONS = (N_("What you see"), N_("Check"), N_("Fix"), N_("Reload"), N_("Verify"), N_("Re-test"))
VALIDATORS = ("postfix-main", "postfix-master", "squid", "exim", "sendmail-mc", "nginx", "apache", "tinyproxy",
              "privoxy", "dante", "opensmtpd", "none")
# Products (as named in the front matter's `products`) whose configuration a validator here reads: software Debian
# packages, which the tests install and run (tests/snippet_validators.py). Every configuration block of their guides
# is validated by one of these; `validate=none` there is only for commands to type, or names why= it cannot be.
VALIDATED_PRODUCTS: dict[str, tuple[str, ...]] = {
    "Postfix": ("postfix-main", "postfix-master"), "Sendmail": ("sendmail-mc",), "Exim": ("exim",),
    "Squid": ("squid",), "Apache httpd": ("apache",), "nginx": ("nginx",), "tinyproxy": ("tinyproxy",),
    "Privoxy": ("privoxy",), "Dante": ("dante",), "OpenSMTPD": ("opensmtpd",),
}
# Products no validator here can check, each with the reason. A product guide names a product of one of the lists.
UNVALIDATED_PRODUCTS: dict[str, str] = {
    "Microsoft Exchange": "Windows only, configured through the Exchange Management Shell or its admin center",
    "Microsoft IIS SMTP": "Windows only, configured in the IIS 6.0 Manager",
    "Microsoft ISA / Forefront TMG": "Windows only, configured in its management console",
    "hMailServer": "Windows only, configured in its administrator program",
    "MDaemon": "Windows only, configured in its own interface",
    "CCProxy": "Windows only, configured in its own interface",
    "WinGate": "Windows only, configured in its own interface",
    "HCL/Lotus Domino": "proprietary, configured in the Domino Administrator client",
    "Zimbra": "its own packages, not Debian's; configured with zmprov commands",
    "qmail": "configured by one-line control files and a tcprules database; no checker of them is installed here",
    "Apache Traffic Server": "not installed in the test image yet: no validator here",
    "3proxy": "not installed in the test image yet: no validator here",
}
COMMAND_LANGUAGES = ("sh", "powershell", "bat")  # blocks of commands to type: validate=none is right for them
# Why a configuration block of a validated product may stay unvalidated (written `why=<key>` after validate=none)
UNVALIDATED_BLOCKS = {
    "old-version": "syntax for an older release than the validator runs (the guide says which)",
    "map-file": "a lookup table the product compiles separately (e.g. Sendmail's access map), not read by the "
                "validator",
}
REQUIRED = ("slug", "title", "service", "products", "sources", "updated")
SITE_PATHS = {"/", "/start", "/guides", "/privacy", "/docs", "/about"}
FIX_ANCHOR = "fix"
CHECK_ANCHOR = "check"
# Fix subsections every product guide may have that address no cause of their own
FIX_SECTIONS_WITHOUT_CAUSE = ("what-this-does-not-break",)
CAUSE_KEYS = ("id", "title", "check", "shows", "fix", "changes")


@dataclass(frozen=True)
class Cause:
    """One way the product ends up open, as the guide's front matter declares it, tied to where the guide's Check
    looks for it and where its Fix removes it; check-guides holds the guide to it."""

    id: str
    title: str
    check: str  # anchor: the Check section itself, or one of its level-3 subsections
    shows: str  # text that subsection contains: the command or setting that reveals the cause
    fix: tuple[str, ...]  # anchors of the Fix subsections that remove it (one per system where the steps differ)
    changes: str  # text each of those contains: the setting or command that removes it


@dataclass(frozen=True)
class CodeBlock:
    language: str
    validate: str | None
    content: str
    line: int
    why: str | None = None  # why a configuration block is not validated (UNVALIDATED_BLOCKS)


@dataclass
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
    html: str = ""
    toc: list[tuple[int, str, str]] = field(default_factory=list)  # (level, anchor, text)
    blocks: list[CodeBlock] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    text: str = ""  # plain text, for the search
    missing: list[str] = field(default_factory=list)  # front matter keys check-guides reports
    weight: int = 50  # order among general guides listed for a finding: lower first
    causes: list[Cause] = field(default_factory=list)
    fix_notes: list[str] = field(default_factory=list)  # anchors of Fix subsections that address no cause
    sections: dict[str, tuple[str, str]] = field(default_factory=dict)  # anchor -> (level-2 anchor, its text)
    cause_html: dict[str, str] = field(default_factory=dict)  # cause id -> its title rendered (inline Markdown)

    def matches(self, text: str) -> bool:
        return any(p.search(text) for p in self.fingerprints)

    @property
    def anchors(self) -> set[str]:
        return {anchor for _level, anchor, _text in self.toc}

    def summary(self) -> dict[str, Any]:
        return {"slug": self.slug, "title": self.title, "service": self.service, "products": self.products,
                "versions": self.versions, "sources": self.sources, "updated": self.updated}


class GuideError(ValueError):
    pass


def parse_guide(text: str, path: str = "") -> Guide:
    meta, body = _front_matter(text, path)
    _check_identity(meta, path)
    sources = _sources(meta, path)
    patterns = _fingerprints(meta, path)
    return Guide(
        slug=str(meta["slug"]), title=str(meta["title"]), service=str(meta["service"]), body=body,
        products=[str(p) for p in meta.get("products") or []], versions=str(meta.get("versions") or ""),
        fingerprints=patterns, sources=sources, updated=str(meta.get("updated") or ""), path=path,
        missing=[key for key in REQUIRED if not meta.get(key)], weight=int(meta.get("weight") or 50),
        causes=_causes(meta, path), fix_notes=[str(a) for a in meta.get("fix_notes") or []])


def _front_matter(text: str, path: str) -> tuple[dict[str, Any], str]:
    """The YAML between the opening `---` line and the next one, and the Markdown body after it."""
    if not text.startswith("---\n"):
        raise GuideError(f"{path}: no front matter")
    try:
        _, front, body = text.split("---\n", 2)
    except ValueError:
        raise GuideError(f"{path}: front matter not closed") from None
    try:
        meta: dict[str, Any] = yaml.safe_load(front) or {}
    except yaml.YAMLError as exc:
        raise GuideError(f"{path}: front matter is not YAML ({exc})") from None
    return meta, body


def _check_identity(meta: dict[str, Any], path: str) -> None:
    """A guide cannot load without a slug, a title and one of the services."""
    for key in ("slug", "title", "service"):
        if not meta.get(key):
            raise GuideError(f"{path}: front matter lacks {key!r}")
    if not SLUG.match(str(meta["slug"])):
        raise GuideError(f"{path}: bad slug {meta['slug']!r}")
    if meta["service"] not in SERVICES:
        raise GuideError(f"{path}: service must be one of {SERVICES}")


def _sources(meta: dict[str, Any], path: str) -> list[str]:
    sources = [str(s) for s in meta.get("sources") or []]
    if any(not s.startswith(("https://", "http://")) for s in sources):
        raise GuideError(f"{path}: every source must be an http(s) address")
    return sources


def _fingerprints(meta: dict[str, Any], path: str) -> list[re.Pattern[str]]:
    """The front matter's fingerprints as case-insensitive patterns; one that does not compile stops the load."""
    patterns = []
    for pattern in meta.get("fingerprints") or []:
        try:
            patterns.append(re.compile(str(pattern), re.IGNORECASE))
        except re.error as exc:
            raise GuideError(f"{path}: fingerprint {pattern!r} does not compile ({exc})") from None
    return patterns


def _causes(meta: dict[str, Any], path: str) -> list[Cause]:
    """The front matter's causes; one that is not a mapping of CAUSE_KEYS to text stops the load."""
    causes = []
    for entry in meta.get("causes") or []:
        if not isinstance(entry, dict) or set(entry) != set(CAUSE_KEYS):
            raise GuideError(f"{path}: each cause is a mapping of exactly {list(CAUSE_KEYS)} (found {entry!r})")
        fix = entry["fix"] if isinstance(entry["fix"], list) else [entry["fix"]]
        values = [entry[key] for key in CAUSE_KEYS if key != "fix"] + fix
        if not fix or any(not isinstance(v, str) or not v.strip() for v in values):
            raise GuideError(f"{path}: cause {entry.get('id')!r}: every field is non-empty text")
        causes.append(Cause(entry["id"], entry["title"], entry["check"], entry["shows"], tuple(fix),
                            entry["changes"]))
    return causes


def _fence_info(info: str) -> tuple[str, dict[str, str]]:
    words = info.split()
    language = words[0] if words and "=" not in words[0] else ""
    attrs = dict(word.split("=", 1) for word in words if "=" in word)
    return language, attrs


def _highlight(code: str, language: str, _attrs: Any) -> str:
    try:
        lexer = get_lexer_by_name(language) if language else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes and wraps it itself
    return str(pygments_highlight(code, lexer, HtmlFormatter(nowrap=True)))


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight}).enable("table")
    md.use(anchors_plugin, min_level=2, max_level=3)
    return md


def _inline_text(token: Token) -> str:
    """The words of an inline token; a line break inside a paragraph is a space (else two words would join)."""
    return "".join(" " if child.type in ("softbreak", "hardbreak") else child.content
                   for child in (token.children or []) if child.type in ("text", "code_inline", "softbreak",
                                                                         "hardbreak"))


class _SectionText:
    """The text under each heading while a guide's tokens are read: a level-2 section's text holds its
    subsections' text too."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[str, list[str]]] = {}
        self.open: list[str] = []
        self.parent = ""

    def enter(self, level: int, anchor: str) -> None:
        if level == 2:
            self.parent, self.open = anchor, [anchor]
        else:
            self.open = [self.parent, anchor] if self.parent else [anchor]
        self.texts[anchor] = (self.parent if level == 3 else anchor, [])

    def add(self, text: str) -> str:
        for anchor in self.open:
            self.texts[anchor][1].append(text)
        return text

    def done(self) -> dict[str, tuple[str, str]]:
        return {anchor: (parent, "\n".join(parts)) for anchor, (parent, parts) in self.texts.items()}


class GuideLibrary:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.guides: dict[str, Guide] = {}
        self._md = _markdown()
        content = hashlib.sha256()
        for file in sorted(root.glob("*/*.md")):
            text = file.read_text(encoding="utf-8")
            content.update(f"{file.relative_to(root)}\0{len(text)}\0{text}".encode())
            guide = parse_guide(text, str(file.relative_to(root)))
            if guide.slug in self.guides:
                raise GuideError(f"{guide.path}: duplicate slug {guide.slug!r} (also {self.guides[guide.slug].path})")
            self._render(guide)
            self.guides[guide.slug] = guide
        # what the library is made of: a stored match (app/store.py Derived.guides_key) made with another is stale
        self.digest = content.hexdigest()

    def _render(self, guide: Guide) -> None:
        tokens = self._md.parse(guide.body)
        words: list[str] = [guide.title, " ".join(guide.products)]
        sections = _SectionText()
        for index, token in enumerate(tokens):
            if token.type == "heading_open" and token.tag in ("h2", "h3"):
                text = _inline_text(tokens[index + 1])
                guide.toc.append((int(token.tag[1]), str(token.attrs.get("id", "")), text))
                sections.enter(int(token.tag[1]), str(token.attrs.get("id", "")))
            elif token.type == "fence":
                language, attrs = _fence_info(token.info)
                line = (token.map[0] + 1) if token.map else 0
                guide.blocks.append(CodeBlock(language, attrs.get("validate"), token.content, line, attrs.get("why")))
                words.append(sections.add(token.content))
            elif token.type == "inline":
                words.append(sections.add(_inline_text(token)))
                guide.links.extend(str(child.attrs.get("href", "")) for child in token.children or []
                                   if child.type == "link_open")
        guide.html = self._md.renderer.render(tokens, self._md.options, {})
        guide.text = " ".join(words).lower()
        guide.sections = sections.done()
        guide.cause_html = {cause.id: self._md.renderInline(cause.title) for cause in guide.causes}

    def get(self, slug: str) -> Guide | None:
        return self.guides.get(slug)

    def all(self) -> list[Guide]:
        return sorted(self.guides.values(), key=lambda g: (SERVICES.index(g.service), g.title.lower()))

    def render(self, guide: Guide) -> str:
        return guide.html

    def search(self, query: str = "", service: str = "") -> list[Guide]:
        terms = [t for t in query.lower().split() if t][:10]
        return [g for g in self.all() if (not service or g.service == service)
                and all(term in g.text for term in terms)]

    def for_check(self, result: CheckResult) -> list[Guide]:
        """Guides for a finding, best first: the product's own guide (product, then fingerprint match), then, for
        an open finding, the service's general guides. Nothing for a closed or unreachable port. A blocklist
        listing: the general guides about blocklists ("Getting off blocklists")."""
        if result.verdict is Verdict.LISTED:
            return [g for g in self._general() if "blocklist" in g.products]
        if result.verdict not in (Verdict.OPEN, Verdict.INCONCLUSIVE, Verdict.AUTH_REQUIRED):
            return []
        product = (result.fingerprint or {}).get("product")
        evidence = _evidence_text(result)
        ranked: list[tuple[int, Guide]] = []
        for guide in self.all():
            if guide.service != result.service:
                continue
            if product and product in guide.products:
                ranked.append((0, guide))
            elif evidence and guide.matches(evidence):
                ranked.append((1, guide))
        found = [g for _rank, g in sorted(ranked, key=lambda pair: pair[0])]
        if result.verdict is Verdict.OPEN:
            # an open proxy that names no product: most likely malware, not software someone installed
            unknown = result.service == "proxy" and not product and not found
            wanted = ["unknown-proxy", "proxy"] if unknown else [result.service]
            general = self._general()
            for tag in wanted:
                found += [g for g in general if tag in g.products and g not in found]
        return found

    def _general(self) -> list[Guide]:
        return sorted((g for g in self.all() if g.service == "general"), key=lambda g: (g.weight, g.title))

    def problems(self) -> list[str]:
        """Everything check-guides reports: front matter, sections, code blocks, links."""
        found: list[str] = []
        for guide in self.all():
            where = guide.path
            for key in guide.missing:
                found.append(f"{where}: front matter lacks {key!r}")
            if guide.service != "general":
                if not guide.fingerprints:
                    found.append(f"{where}: a product guide needs fingerprints")
                headings = [text for level, _anchor, text in guide.toc if level == 2]
                if headings != list(PRODUCT_SECTIONS):
                    found.append(f"{where}: sections must be {list(PRODUCT_SECTIONS)}, found {headings}")
            for block in guide.blocks:
                if block.validate not in VALIDATORS:
                    found.append(f"{where}:{block.line}: code block needs validate= one of {VALIDATORS}"
                                 f" (has {block.validate!r})")
            found.extend(_validation_problems(guide))
            found.extend(_cause_problems(guide))
            for href in guide.links:
                problem = self._link_problem(guide, href)
                if problem:
                    found.append(f"{where}: link {href!r}: {problem}")
        return found

    def _link_problem(self, guide: Guide, href: str) -> str | None:
        if href.startswith(("https://", "http://", "mailto:")):
            return None
        if href.startswith("#"):
            return None if href[1:] in guide.anchors else "no such section in this guide"
        if not href.startswith("/"):
            return "use an absolute path or an http(s) address"
        path, _, anchor = href.partition("#")
        if path in SITE_PATHS:
            return None
        if path.startswith("/guides/"):
            target = self.guides.get(path.removeprefix("/guides/"))
            if target is None:
                return "no such guide"
            if anchor and anchor not in target.anchors:
                return f"no section #{anchor} in that guide"
            return None
        return "not a page of this site"


def _validation_problems(guide: Guide) -> list[str]:
    """A product guide names a product of VALIDATED_PRODUCTS or UNVALIDATED_PRODUCTS; in a guide of a validated
    product, every block but commands to type is validated (or says why= it cannot be)."""
    if guide.service == "general":
        return []
    known = [p for p in guide.products if p in VALIDATED_PRODUCTS or p in UNVALIDATED_PRODUCTS]
    if not known:
        return [f"{guide.path}: products {guide.products} are in neither VALIDATED_PRODUCTS nor UNVALIDATED_PRODUCTS"
                " (app/guides.py): name the validator of its snippets, or say why none can check them"]
    validators = [v for p in guide.products for v in VALIDATED_PRODUCTS.get(p, ())]
    if not validators:
        return []
    found = []
    for block in guide.blocks:
        if block.validate != "none" or block.language in COMMAND_LANGUAGES:
            continue
        if block.why in UNVALIDATED_BLOCKS:
            continue
        found.append(f"{guide.path}:{block.line}: this {block.language or 'plain'} block of {'/'.join(guide.products)}"
                     f" needs validate={' or validate='.join(validators)}: validate=none is only for commands to"
                     f" type ({', '.join(COMMAND_LANGUAGES)}) or with why= one of {list(UNVALIDATED_BLOCKS)}"
                     + (f" (has why={block.why!r})" if block.why else ""))
    return found


def _cause_problems(guide: Guide) -> list[str]:
    """A product guide declares the causes its Fix addresses; each is looked for in Check (where `shows` is found)
    and removed in Fix (where `changes` is found); every Fix subsection removes a declared cause or is a note."""
    if guide.service == "general":
        return []
    where = guide.path
    if not guide.causes:
        return [f"{where}: a product guide declares the causes its Fix addresses (front matter `causes`)"]
    found = []
    ids = [cause.id for cause in guide.causes]
    for cause in guide.causes:
        if not SLUG.match(cause.id) or ids.count(cause.id) > 1:
            found.append(f"{where}: cause id {cause.id!r} must be unique, lower case, digits and hyphens")
        found.extend(_tie_problems(guide, cause, CHECK_ANCHOR, [cause.check], cause.shows))
        found.extend(_tie_problems(guide, cause, FIX_ANCHOR, list(cause.fix), cause.changes))
    tied = {anchor for cause in guide.causes for anchor in cause.fix}
    notes = set(guide.fix_notes) | set(FIX_SECTIONS_WITHOUT_CAUSE)
    for anchor, (parent, _text) in guide.sections.items():
        if parent == FIX_ANCHOR and anchor != FIX_ANCHOR and anchor not in tied | notes:
            found.append(f"{where}: Fix subsection #{anchor} removes no declared cause: declare its cause (and"
                         " where Check looks for it), or list it in `fix_notes`")
    return found


def _tie_problems(guide: Guide, cause: Cause, section: str, anchors: list[str], text: str) -> list[str]:
    """Each anchor is the section itself or one of its subsections, and its text contains `text`."""
    found = []
    name = "Check" if section == CHECK_ANCHOR else "Fix"
    for anchor in anchors:
        parent, body = guide.sections.get(anchor, ("", ""))
        if parent != section:
            found.append(f"{guide.path}: cause {cause.id!r}: #{anchor} is not the {name} section nor one of its"
                         " subsections")
        elif text.lower() not in body.lower():
            verb = "shows" if section == CHECK_ANCHOR else "changes"
            found.append(f"{guide.path}: cause {cause.id!r}: {name} #{anchor} does not contain its `{verb}` text"
                         f" {text!r}")
    return found


def guide_url(guide: Guide, section: str = "") -> str:
    return f"/guides/{guide.slug}" + (f"#{section}" if section and section in guide.anchors else "")


def pygments_css() -> str:
    return str(HtmlFormatter().get_style_defs("pre code"))  # type: ignore[no-untyped-call]


def _evidence_text(result: CheckResult) -> str:
    parts: list[str] = []
    if result.fingerprint:
        parts.extend(str(v) for v in result.fingerprint.values() if v)
    parts.extend(line.text for line in result.transcript if line.dir == "in")
    return "\n".join(parts)
