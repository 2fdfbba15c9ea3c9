"""The visitor's journey on a real server, in Debian's chromium: a real open Postfix is found open, the visitor
follows the result's link to the Postfix guide's Fix, the guide's Fix (read from guides/relay/postfix.md) is applied
to that Postfix and reloaded as the guide says, and the re-test clicked in the browser says it is fixed.

Why a namespace: the site tests the address a visitor comes from, from its own address. On loopback both are
127.0.0.1, which the guide's Fix rightly keeps trusted (`mynetworks = 127.0.0.0/8 ...`), so a Fix that closes
nothing would pass there. As in tests/servers/test_guide_fixes.py, the open Postfix runs in a network namespace
that this test makes (servers/netns.py: a veth pair in 198.18.0.0/15), on `place.host`; the site is served on
our side of the pair (`place.peer`), with its sink there. The browser runs inside the namespace too (a small
wrapper, `ip netns exec NAME chromium`, is Playwright's `executable_path`), so the visitor's requests really come
from the server's address (the start page says "Test my server at 198.18.X.2"), without trusting any forwarded
header, and the probes reach Postfix from 198.18.X.1, an address the Fix does not trust, as from the Internet.

The guide's steps are done by tests/servers/guide_fix.py's machinery (PRODUCTS["Postfix"]: its open fixture, its
`localize`, `apply` and `reload`, GuideSteps for the Markdown), nothing is copied here: a guide whose Fix is
rewritten to leave Postfix open turns this test red at the re-test. Needs chromium, root, iproute2 and postfix:
under CI=true a missing one fails the test, elsewhere it skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from browser_support import CHROMIUM_ARGS, chromium_inside, screenshot
from support import ServedSite, free_port, require_binary, skip_or_fail

from app.config import Settings
from servers import guide_fix
from servers.guide_fix import GUIDES, PRODUCTS, GuideSteps, run_check, site_settings
from servers.netns import Netns, NetnsUnavailable, Place
from servers.netns import available as netns_available

AUDIT_MS = int(guide_fix.AUDIT_SECONDS * 1000)


def require_everything() -> None:
    require_binary("/usr/bin/chromium", "chromium")
    require_binary("/usr/sbin/postfix", "postfix")
    try:
        netns_available()
    except NetnsUnavailable as exc:
        skip_or_fail(str(exc))
    from servers.postfix import PostfixUnavailable, postfix_available

    try:
        postfix_available()
    except PostfixUnavailable as exc:
        skip_or_fail(str(exc))


def served_env(settings: Settings) -> dict[str, str]:
    """guide_fix.site_settings (the site for a fixture in a namespace) as the served site's environment; the
    database and the public URL are ServedSite's own."""
    env = {}
    for name in sorted(settings.model_fields_set - {"database_url", "public_url"}):
        value = getattr(settings, name)
        env[f"SECURE_{name.upper()}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return env


def apply_the_guide(fixture: Any, guide: Path = GUIDES / PRODUCTS["Postfix"].guide) -> Any:
    """What the owner does on the server, with the guide open: Check shows the cause, the Fix goes into main.cf
    as the guide says, Reload; Check no longer shows the cause. The fixture after the reload."""
    product, steps = PRODUCTS["Postfix"], GuideSteps.read(guide)
    config = product.config(fixture)
    assert product.reveals(run_check(steps, product, fixture, config)), "the guide's Check shows no cause"
    product.apply(config, steps.fix_block().content)
    fixture = product.reload(steps.commands("Reload"), fixture, product, config)
    still = product.reveals(run_check(steps, product, fixture, config))
    assert still is None, f"after the guide's Fix, its Check still shows {still!r}; main.cf:\n{config.read_text()}"
    return fixture


def journey(page: Any, site_url: str, place: Place, fixture: Any) -> Any:
    page.goto(site_url + "/start")
    page.get_by_role("button", name=f"Test my server at {place.host}").click()  # the browser is on the server
    page.wait_for_selector("#status:text('done')", timeout=AUDIT_MS)
    summary = page.inner_text(".summary")
    # real Postfix delivered our messages: confirmed by the site's sink, not only accepted
    assert "Mail relay: open" in summary and "A test message sent through it reached us" in summary, summary
    screenshot(page, "real-postfix-open")
    guide = page.locator("a[href*='/guides/postfix']").first
    assert "#fix" in (guide.get_attribute("href") or "")
    guide.click()
    page.wait_for_url("**/guides/postfix*")
    assert "Postfix" in page.inner_text("h1") and "You came here from your test result" in page.inner_text("main")
    fixture = apply_the_guide(fixture)
    page.get_by_role("link", name="go back to your result").click()
    page.get_by_role("button", name=f"Re-test {place.host}").click()
    page.wait_for_selector("#status:text('done')", timeout=AUDIT_MS)
    screenshot(page, "real-postfix-fixed")
    summary = page.inner_text(".summary")
    assert "Mail relay: closed" in summary and "We found no open relay" in summary, summary
    assert "22 fixed" in page.inner_text(".changes")  # every variant it relayed before, now refused
    return fixture


def test_real_open_postfix_then_its_guides_fix_then_retest_shows_fixed(tmp_path):
    require_everything()
    from playwright.sync_api import sync_playwright

    product = PRODUCTS["Postfix"]
    with Netns.create() as netns:
        place = netns.place
        sink_port = free_port(place.peer)
        fixture = product.start(tmp_path / "server", place, sink_port)
        try:
            env = served_env(site_settings(tmp_path, place, "relay", fixture.port, sink_port))
            with ServedSite(tmp_path, env, port=free_port(place.peer), host=place.peer) as site, \
                    sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(chromium_inside(place.wrap([]), tmp_path)), headless=True,
                    args=CHROMIUM_ARGS)
                page = browser.new_page()
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                try:
                    fixture = journey(page, site.url, place, fixture)
                finally:
                    browser.close()
        finally:
            fixture.stop()
    assert [p for p in problems if "Content Security Policy" in p] == []
