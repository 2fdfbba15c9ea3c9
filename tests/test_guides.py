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
