"""The result page's blocklist section in Debian's chromium: an address listed on two lists (Spamhaus XBL, DroneBL's
HTTP proxy class) with an open proxy found by the real proxy checks; each listing says that our proxy verdict
explains it and links its list's removal page (followed here without leaving the machine: the browser resolves no
name at all, and the removal pages are answered by the test); the re-test after DroneBL dropped the address shows
it as no longer listed. Screenshots: artifacts/result-blocklists.png (the closing proof of issue 17),
artifacts/result-blocklists-phone.png and artifacts/result-blocklists-retest.png."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import pytest
from browser_support import CHROMIUM_ARGS, screenshot
from fakes import proxy as proxy_fakes
from fakes.dns import FakeDns
from support import ServedSite, free_port, require_binary, running_app, wait_done

from app.config import Settings

ZEN = "1.0.0.127.zen.spamhaus.org"
DRONEBL = "1.0.0.127.dnsbl.dronebl.org"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 667}
# no DNS from the browser: every name is "not found" (the site is asked by address); the removal pages are routed
NO_DNS = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"


async def _seed(db: Path) -> dict[str, str]:
    """A real audit (proxy and blocklists) against an open forwarding proxy and a DNS server answering as the lists
    would, then its re-test after DroneBL removed the address."""
    records = {(ZEN, "A"): ["127.0.0.4"], (ZEN, "TXT"): ['"https://check.spamhaus.org/query/ip/127.0.0.1"'],
               (DRONEBL, "A"): ["127.0.0.9"]}
    async with FakeDns(records) as dns_server, proxy_fakes.ForwardingProxy() as proxy:
        settings = Settings(
            database_url=f"sqlite:///{db}", public_url="http://127.0.0.1:9", allow_networks=["127.0.0.0/8"],
            relay_ports=[], proxy_ports=[proxy.port], canary_http_listen=f"127.0.0.1:{free_port()}",
            canary_smtp_listen="127.0.0.1:0", canary_tls_listen="127.0.0.1:0", canary_name="localhost",
            proxy_step_timeout=3, connect_timeout=2, audit_deadline=60, target_cooldown=0,
            dns_servers=[dns_server.server], blocklist_cache_seconds=0)
        async with running_app(settings) as client:
            listed = (await client.post("/api/v1/audits/self", json={"checks": ["proxy", "blocklist"]})).json()["id"]
            data = await wait_done(client, listed, seconds=60)
            assert data["summary"] == {"relay": None, "proxy": "open", "blocklist": "listed"}, data["summary"]
            dns_server.remove(DRONEBL, "A")
            retest = (await client.post(f"/api/v1/audits/{listed}/retest")).json()["id"]
            await wait_done(client, retest, seconds=60)
    return {"listed": listed, "retest": retest}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[ServedSite, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("blocklist-page")
    ids = asyncio.run(_seed(tmp / "site.db"))
    with ServedSite(tmp, {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_TARGET_COOLDOWN": "0"}) as served:
        yield served, ids


@pytest.fixture
def chromium() -> Iterator[Any]:
    executable = require_binary("/usr/bin/chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=[*CHROMIUM_ARGS, NO_DNS])
        yield browser
        browser.close()


def _page(browser: Any, viewport: dict[str, int]) -> Any:
    page = browser.new_context(viewport=viewport).new_page()
    visited: list[str] = []

    def removal_page(route: Any) -> None:  # the list's page, answered here: nothing leaves the machine
        visited.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<h1>removal page (test)</h1>")
    page.route("http*://*.*/**", lambda route: removal_page(route) if "127.0.0.1" not in route.request.url
               else route.continue_())
    page.visited = visited
    return page


def test_two_listings_explained_by_the_open_proxy_with_their_removal_links(site, chromium):
    served, ids = site
    page = _page(chromium, DESKTOP)
    page.goto(f"{served.url}/audits/{ids['listed']}")
    summary = page.locator(".summary .verdict-listed")
    assert summary.is_visible() and "Blocklists" in summary.inner_text()
    section = page.locator("section#blocklists")
    listings = section.locator("li.listing")
    assert listings.count() == 2
    assert listings.nth(0).locator("h3").inner_text().startswith("DroneBL")  # a request is needed: first
    assert listings.nth(1).locator("h3").inner_text().startswith("Spamhaus ZEN")
    for n in range(2):
        explained = listings.nth(n).locator(".explained")
        assert explained.is_visible() and "Our test found an open proxy on this address" in explained.inner_text()
    assert "127.0.0.4 — XBL: Exploits Block List" in listings.nth(1).inner_text()
    assert "https://check.spamhaus.org/query/ip/127.0.0.1" in listings.nth(1).locator(".txt").inner_text()
    links = section.locator("a.removal-link")
    assert [links.nth(n).get_attribute("href") for n in range(2)] == ["https://dronebl.org/lookup",
                                                                     "https://check.spamhaus.org/"]
    for n in range(2):
        box = links.nth(n).bounding_box()
        assert box is not None and box["height"] >= 44  # a tap target on a phone
        assert links.nth(n).get_attribute("rel") == "noopener noreferrer"
    assert section.locator("a[href='/guides/blocklists']").is_visible()
    assert section.locator("details.verdict-not_listed > summary").inner_text().startswith("Not listed: 6 answers")
    path = screenshot(page, "result-blocklists")
    assert path.stat().st_size > 10_000
    with page.expect_navigation():
        links.nth(0).click()
    assert page.visited == ["https://dronebl.org/lookup"] and "removal page" in page.content()
    page.context.close()


def test_the_section_fits_a_phone(site, chromium):
    served, ids = site
    page = _page(chromium, PHONE)
    page.goto(f"{served.url}/audits/{ids['listed']}")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, overflow  # no horizontal scroll (a long TXT URL wraps)
    page.locator("section#blocklists").scroll_into_view_if_needed()
    screenshot(page, "result-blocklists-phone")
    page.context.close()


def test_the_retest_shows_the_listing_that_went_away(site, chromium):
    served, ids = site
    page = _page(chromium, DESKTOP)
    page.goto(f"{served.url}/audits/{ids['retest']}")
    gone = page.locator("section#blocklists .delisted")
    assert gone.is_visible()
    assert "No longer listed since your previous test" in gone.inner_text() and "blocklist.dronebl" in gone.inner_text()
    listings = page.locator("section#blocklists li.listing")
    assert listings.count() == 1 and "still listed" in listings.first.inner_text()
    screenshot(page, "result-blocklists-retest")
    page.context.close()
