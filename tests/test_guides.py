from pathlib import Path

import pytest

from app.guides import GuideError, GuideLibrary, parse_guide
from app.verdicts import CheckResult, Verdict

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_guides_parse_and_cite_sources():
    library = GuideLibrary(ROOT / "guides")
    assert {"what-is-an-open-relay", "what-is-an-open-proxy"} <= set(library.guides)
    for guide in library.all():
        assert guide.sources, guide.slug
        assert library.render(guide).strip()


def test_raw_html_in_a_guide_is_not_rendered(tmp_path):
    (tmp_path / "relay").mkdir()
    (tmp_path / "relay" / "x.md").write_text(
        "---\nslug: x\ntitle: X\nservice: relay\nfingerprints: ['ESMTP Postfix']\n"
        "sources: ['https://www.postfix.org/']\n---\n## Fix\n<script>alert(1)</script>\n")
    library = GuideLibrary(tmp_path)
    html = library.render(library.get("x"))
    assert "<script>" not in html and "&lt;script&gt;" in html
    row = CheckResult("relay", "192.0.2.1", 25, "relay.v1", Verdict.OPEN, "delivered",
                      fingerprint={"product": None, "version": None, "raw": "220 mx ESMTP Postfix (Debian)"})
    assert [g.slug for g in library.for_check(row)] == ["x"]


@pytest.mark.parametrize("text", [
    "no front matter",
    "---\ntitle: X\nservice: relay\n---\nbody",
    "---\nslug: Bad Slug\ntitle: X\nservice: relay\n---\nbody",
    "---\nslug: x\ntitle: X\nservice: mail\n---\nbody",
    "---\nslug: x\ntitle: X\nservice: relay\nsources: ['javascript:alert(1)']\n---\nbody",
])
def test_bad_guides_are_refused(text):
    with pytest.raises(GuideError):
        parse_guide(text, "t.md")



@pytest.mark.parametrize("text,message", [
    ("no front matter", "t.md: no front matter"),
    ("---\nslug: x\n", "t.md: front matter not closed"),
    ("---\nslug: [x\n---\nbody", "t.md: front matter is not YAML"),
    ("---\n---\nbody", "t.md: front matter lacks 'slug'"),  # empty front matter
    ("---\nslug: x\nservice: mail\n---\nbody", "t.md: front matter lacks 'title'"),  # checked in this order
    ("---\nslug: x\ntitle: X\n---\nbody", "t.md: front matter lacks 'service'"),
    ("---\nslug: Bad\ntitle: X\nservice: mail\n---\nbody", "t.md: bad slug 'Bad'"),
    ("---\nslug: x\ntitle: X\nservice: mail\nsources: [ftp://x]\n---\nbody", "t.md: service must be one of"),
    ("---\nslug: x\ntitle: X\nservice: relay\nsources: [ftp://x]\nfingerprints: ['(']\n---\nbody",
     "t.md: every source must be an http(s) address"),
    ("---\nslug: x\ntitle: X\nservice: relay\nfingerprints: ['ok', '(']\n---\nbody",
     "t.md: fingerprint '(' does not compile"),
])
def test_each_refusal_says_what_is_wrong_first(text, message):
    with pytest.raises(GuideError) as info:
        parse_guide(text, "t.md")
    assert str(info.value).startswith(message), str(info.value)


def test_a_guide_is_read_from_its_front_matter():
    guide = parse_guide("---\nslug: x\ntitle: X\nservice: proxy\nproducts: [Squid, 3]\nversions: 4 to 6\n"
                        "fingerprints: ['squid/\\d']\nsources: ['http://a.example/', 'https://b.example/']\n"
                        "weight: 7\n---\n## Fix\n---\nmore\n", "proxy/x.md")
    assert (guide.slug, guide.title, guide.service, guide.path) == ("x", "X", "proxy", "proxy/x.md")
    assert guide.body == "## Fix\n---\nmore\n"  # a later --- line belongs to the body
    assert (guide.products, guide.versions, guide.weight) == (["Squid", "3"], "4 to 6", 7)
    assert guide.sources == ["http://a.example/", "https://b.example/"]
    assert guide.matches("Via: 1.1 host (SQUID/5.7)") and not guide.matches("squid/x")  # case-insensitive
    assert (guide.updated, guide.missing) == ("", ["updated"])
    bare = parse_guide("---\nslug: y\ntitle: Y\nservice: general\n---\n")
    assert (bare.weight, bare.versions, bare.products, bare.fingerprints, bare.body) == (50, "", [], [], "")
    assert bare.missing == ["products", "sources", "updated"]

def test_an_unnamed_open_proxy_points_to_the_infected_computer_guide():
    library = GuideLibrary(ROOT / "guides")
    unnamed = CheckResult("proxy", "192.0.2.1", 1080, "proxy.socks5", Verdict.OPEN, "token_returned",
                          fingerprint={"product": None, "version": None, "raw": "SOCKS: SOCKS5"})
    assert [g.slug for g in library.for_check(unnamed)][0] == "infected-computer"
    named = CheckResult("proxy", "192.0.2.1", 3128, "proxy.http_get", Verdict.OPEN, "token_returned",
                        fingerprint={"product": "Squid", "version": "5.7", "raw": "server: squid/5.7"})
    assert "infected-computer" not in [g.slug for g in library.for_check(named)]
    closed = CheckResult("proxy", "192.0.2.1", 1080, "proxy.socks5", Verdict.CLOSED, "not_a_proxy")
    assert library.for_check(closed) == []


PRODUCT = """---
slug: demo
title: Demo
service: relay
products: [Postfix]
versions: "3.x"
fingerprints: ['ESMTP Postfix']
sources: ['https://www.postfix.org/']
updated: 2026-11-27
causes:
  - id: wide-mynetworks
    title: mynetworks names networks that are not yours
    check: check
    shows: postconf mynetworks
    fix: [fix]
    changes: "mynetworks ="
  - id: permit-all
    title: the relay restrictions permit everyone
    check: 2-restrictions
    shows: smtpd_relay_restrictions
    fix: restrictions
    changes: reject_unauth_destination
fix_notes: [older-releases]
---
## What you see
x
## Check
```sh validate=none
postconf mynetworks
```
### 2. Restrictions
```sh validate=none
postconf smtpd_relay_restrictions
```
## Fix
```ini validate=postfix-main
mynetworks = 127.0.0.0/8
```
### Restrictions
```ini validate=postfix-main
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
```
### Older releases
x
### What this does not break
x
## Reload
x
## Verify
See [the fix](#fix) and [start](/start) and [the other guide](/guides/other#fix).
## Re-test
x
"""

OTHER = PRODUCT.replace("slug: demo", "slug: other").replace("products: [Postfix]", "products: [Exim]").replace(
    "ESMTP Postfix", "Exim").replace("/guides/other#fix", "/guides/demo#fix")


def library_of(tmp_path, **files):
    for name, text in files.items():
        folder = tmp_path / ("general" if "general" in name else "relay")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.md").write_text(text)
    return GuideLibrary(tmp_path)


def test_a_correct_guide_has_no_problems_and_renders_anchors_toc_and_highlighting(tmp_path):
    library = library_of(tmp_path, demo=PRODUCT, other=OTHER)
    assert library.problems() == []
    guide = library.get("demo")
    assert [t for level, _a, t in guide.toc if level == 2] == ["What you see", "Check", "Fix", "Reload", "Verify",
                                                                "Re-test"]
    assert 'id="fix"' in guide.html and 'class="language-ini"' in guide.html and "<span" in guide.html
    assert [(b.language, b.validate) for b in guide.blocks] == [("sh", "none"), ("sh", "none"),
                                                                  ("ini", "postfix-main"), ("ini", "postfix-main")]
    assert [(c.id, c.check, c.fix) for c in guide.causes] == [("wide-mynetworks", "check", ("fix",)),
                                                              ("permit-all", "2-restrictions", ("restrictions",))]
    # a section's text holds its subsections' text; a subsection's only its own
    assert "smtpd_relay_restrictions" in guide.sections["check"][1]
    assert guide.sections["2-restrictions"][0] == "check"
    assert "postconf mynetworks" not in guide.sections["2-restrictions"][1]


@pytest.mark.parametrize("change,problem", [
    (lambda t: t.replace("## Reload\nx\n", ""), "sections must be"),
    (lambda t: t.replace("## Check", "## Checks"), "sections must be"),
    (lambda t: t.replace("```ini validate=postfix-main", "```ini"), "needs validate="),
    (lambda t: t.replace("```ini validate=postfix-main", "```ini validate=postfx"), "needs validate="),
    (lambda t: t.replace("(#fix)", "(#nowhere)"), "no such section"),
    (lambda t: t.replace("(/start)", "(/nowhere)"), "not a page of this site"),
    (lambda t: t.replace("/guides/other#fix", "/guides/missing"), "no such guide"),
    (lambda t: t.replace("/guides/other#fix", "/guides/other#nope"), "no section #nope"),
    (lambda t: t.replace("updated: 2026-11-27\n", ""), "lacks 'updated'"),
    (lambda t: t.replace("fingerprints: ['ESMTP Postfix']\n", ""), "needs fingerprints"),
    # a guide of software we can check: its configuration is validated, validate=none is for commands to type
    (lambda t: t.replace("```ini validate=postfix-main", "```ini validate=none"), "validate=none is only for commands"),
    (lambda t: t.replace("```ini validate=postfix-main", "```ini validate=none why=later"), "(has why='later')"),
    (lambda t: t.replace("```ini validate=postfix-main", "```validate=none"), "this plain block of Postfix needs"),
    (lambda t: t.replace("products: [Postfix]", "products: [Unknownware]"), "in neither VALIDATED_PRODUCTS"),
    # causes: each is looked for in Check and removed in Fix, and every Fix subsection removes one (or is a note)
    (lambda t: t.split("causes:")[0] + "fix_notes:" + t.split("fix_notes:")[1], "declares the causes"),
    (lambda t: t.replace("postconf smtpd_relay_restrictions\n", "postconf -n\n"),
     "cause 'permit-all': Check #2-restrictions does not contain its `shows` text 'smtpd_relay_restrictions'"),
    (lambda t: t.replace("check: 2-restrictions", "check: restrictions"),
     "cause 'permit-all': #restrictions is not the Check section nor one of its subsections"),
    (lambda t: t.replace("check: 2-restrictions", "check: nowhere"), "#nowhere is not the Check section"),
    (lambda t: t.replace("fix: restrictions", "fix: 2-restrictions"), "#2-restrictions is not the Fix section"),
    (lambda t: t.replace("fix: [fix]", "fix: [fix, restrictions]"),
     "cause 'wide-mynetworks': Fix #restrictions does not contain its `changes` text 'mynetworks ='"),
    (lambda t: t.replace("fix_notes: [older-releases]", "fix_notes: []"),
     "Fix subsection #older-releases removes no declared cause"),
    (lambda t: t.replace("### Older releases", "### Older releases\n### Another way in"),
     "Fix subsection #another-way-in removes no declared cause"),
    (lambda t: t.replace("id: permit-all", "id: wide-mynetworks"), "cause id 'wide-mynetworks' must be unique"),
    (lambda t: t.replace("id: permit-all", "id: Permit All"), "cause id 'Permit All' must be unique, lower case"),
])
def test_check_guides_finds_each_problem(tmp_path, change, problem):
    library = library_of(tmp_path, demo=change(PRODUCT), other=OTHER)
    assert any(problem in p for p in library.problems()), library.problems()


@pytest.mark.parametrize("change", [
    lambda t: t.replace("```ini validate=postfix-main", "```ini validate=none why=old-version"),
    lambda t: t.replace("```ini validate=postfix-main", "```ini validate=none why=map-file"),
    lambda t: t.replace("```sh validate=none", "```powershell validate=none"),
    lambda t: t.replace("products: [Postfix]", "products: [Microsoft Exchange]").replace(
        "```ini validate=postfix-main", "```ini validate=none"),  # no validator can check Exchange
])
def test_what_may_stay_unvalidated(tmp_path, change):
    library = library_of(tmp_path, demo=change(PRODUCT), other=OTHER)
    assert library.problems() == []


@pytest.mark.parametrize("causes", [
    "causes: [just-a-name]",
    "causes:\n  - {id: x, title: X, check: check, shows: s, fix: fix}",  # `changes` missing
    "causes:\n  - {id: x, title: X, check: check, shows: s, fix: fix, changes: c, more: m}",
    "causes:\n  - {id: x, title: X, check: check, shows: '', fix: fix, changes: c}",
    "causes:\n  - {id: x, title: X, check: check, shows: s, fix: [], changes: c}",
    "causes:\n  - {id: x, title: X, check: check, shows: 3, fix: fix, changes: c}",
])
def test_a_malformed_cause_stops_loading(causes):
    with pytest.raises(GuideError, match="cause"):
        parse_guide(_with_causes(causes), "t.md")


def _with_causes(causes: str) -> str:
    head, rest = PRODUCT.split("causes:\n", 1)
    return head + causes + "\nfix_notes:" + rest.split("fix_notes:", 1)[1]


def test_a_bad_fingerprint_or_duplicate_slug_stops_loading(tmp_path):
    with pytest.raises(GuideError, match="does not compile"):
        library_of(tmp_path, demo=PRODUCT.replace("['ESMTP Postfix']", "['(unclosed']"))
    with pytest.raises(GuideError, match="duplicate slug"):
        library_of(tmp_path / "dup", demo=PRODUCT, copy=PRODUCT)


def test_ranking_product_first_then_fingerprint_then_general(tmp_path):
    general = ("---\nslug: gen\ntitle: Gen\nservice: general\nproducts: [relay]\nsources: ['https://x.org/']\n"
               "updated: 2026-11-27\n---\nbody\n")
    library = library_of(tmp_path, demo=PRODUCT, other=OTHER, general_gen=general)
    by_product = CheckResult("relay", "192.0.2.1", 25, "relay.v2", Verdict.OPEN, "delivered",
                             fingerprint={"product": "Exim", "version": "4.96", "raw": "220 x ESMTP Postfix-like"})
    assert [g.slug for g in library.for_check(by_product)] == ["other", "demo", "gen"]
    closed = CheckResult("relay", "192.0.2.1", 25, "relay.v2", Verdict.CLOSED, "relay_denied",
                         fingerprint={"product": "Exim", "version": None, "raw": "x"})
    assert library.for_check(closed) == []


def test_a_line_break_inside_a_paragraph_separates_words(tmp_path):
    library = library_of(tmp_path, demo=PRODUCT.replace("## What you see\nx\n", "## What you see\nLocal to external\ne-mail\n"),
                         other=OTHER)
    guide = library.get("demo")
    assert "external e-mail" in guide.text and "externale-mail" not in guide.text
    assert "external e-mail" in guide.sections["what-you-see"][1]


def test_search_and_filter(tmp_path):
    library = library_of(tmp_path, demo=PRODUCT, other=OTHER)
    assert [g.slug for g in library.search("exim")] == ["other"]
    assert [g.slug for g in library.search("", "proxy")] == []
    assert len(library.search("mynetworks")) == 2


def test_the_shipped_guides_pass_check_guides():
    from app.cli import check_guides

    assert check_guides() == 0
