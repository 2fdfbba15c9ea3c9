"""The result page in Debian's chromium: the verdicts and next step on top of a phone's screen, one block per port
(collapsed lines that expand), no horizontal scroll at 375 px on any page, tap targets of 44 px, and the printed
report. Four states come from real audits against fakes (all unreachable; an open Postfix-looking relay; an open
Squid-looking proxy; the relay after its fix, a re-test), served by the real site; screenshots at 1280 and 375 px
and the printed report as PDF go to artifacts/ (result-*.png, result-*.pdf)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from fakes import proxy as proxy_fakes
from fakes import smtp as fakes
from support import ARTIFACTS, ServedSite, free_port, running_app, wait_done

from app.config import Settings
from app.store import Audit, Store, new_id
from app.verdicts import CheckResult, TranscriptLine, Verdict

PHONE = {"width": 375, "height": 667}
DESKTOP = {"width": 1280, "height": 900}
POSTFIX_BANNER = b"220 mail.example-office.test ESMTP Postfix (Debian/GNU)\r\n"


class SwitchableRelay(fakes.OpenRelay):
    banner = POSTFIX_BANNER
    open = True

    def rcpt(self, conn, arg):
        return super().rcpt(conn, arg) if self.open else fakes.Policy.rcpt(self, conn, arg)


class SquidLike(proxy_fakes.ForwardingProxy):
    """The forwarding fake, naming itself as Squid does."""

    async def _write(self, writer, data: bytes) -> None:
        await super()._write(writer, data.replace(b"fakeproxy/1.0", b"squid/5.7"))


async def _audit(client: Any, checks: list[str]) -> str:
    audit_id = (await client.post("/api/v1/audits", json={"target": "self", "checks": checks})).json()["id"]
    await wait_done(client, audit_id, seconds=60)
    return audit_id


async def _seed(db: Path) -> dict[str, str]:
    """Real audits against fakes, stored in `db`: the four states of the result page."""
    relay, squid = SwitchableRelay(), SquidLike()
    async with fakes.FakeSmtpServer(relay) as smtp_server, squid:
        settings = Settings(
            database_url=f"sqlite:///{db}", public_url="http://127.0.0.1:9", allow_networks=["127.0.0.0/8"],
            relay_ports=[smtp_server.port, free_port(), free_port()], proxy_ports=[squid.port, free_port()],
            canary_http_listen="127.0.0.1:0", canary_smtp_listen="127.0.0.1:0", canary_tls_listen="127.0.0.1:0",
            canary_name="localhost", proxy_step_timeout=3, connect_timeout=2, audit_deadline=60, target_cooldown=0)
        async with running_app(settings) as client:
            ids = {"relay": await _audit(client, ["relay"]), "proxy": await _audit(client, ["proxy"])}
            relay.open = False
            ids["fixed"] = (await client.post(f"/api/v1/audits/{ids['relay']}/retest")).json()["id"]
            await wait_done(client, ids["fixed"], seconds=60)
        settings.relay_ports, settings.proxy_ports = [free_port(), free_port(), free_port()], [free_port(), free_port()]
        async with running_app(settings) as client:
            ids["unreachable"] = await _audit(client, ["relay", "proxy"])
    return ids


async def _seed_unfinished(db: Path) -> dict[str, str]:
    """A running audit with a few rows, and an interrupted one: seeded while the site runs (at start it marks
    unfinished audits interrupted)."""
    store = Store(str(db))
    await store.open()
    ids = {}
    try:
        for status in ("running", "interrupted"):
            audit = Audit(id=new_id(), created_at=time.time(), status=status, target="self", requester="127.0.0.1",
                          hosts=["127.0.0.1"], services=["relay", "proxy"], planned=90, engine_version="test",
                          started_at=time.time())
            await store.create_audit(audit, ["127.0.0.1"])
            for seq in range(1, 6):
                await store.add_check(audit.id, seq, CheckResult(
                    "relay", "127.0.0.1", 25, f"relay.v{seq}", Verdict.CLOSED, "relay_denied",
                    transcript=[TranscriptLine(0.0, "in", "220 mail.example-office.test ESMTP " + "x" * 300),
                                TranscriptLine(0.1, "in", "554 5.7.1 <a@b>: Relay access denied")]))
            if status == "interrupted":
                await store.finish_audit(audit.id, "interrupted", {"relay": "closed", "proxy": None},
                                         "the site restarted")
            ids[status] = audit.id
    finally:
        await store.close()
    return ids


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[ServedSite, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("result-page")
    ids = asyncio.run(_seed(tmp / "site.db"))
    with ServedSite(tmp, {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_TARGET_COOLDOWN": "0"}) as served:
        ids.update(asyncio.run(_seed_unfinished(tmp / "site.db")))
        yield served, ids


def _page(browser: Any, viewport: dict[str, int], **options: Any) -> Any:
    context = browser.new_context(viewport=viewport, **options)
    return context.new_page()


def test_a_port_where_nothing_listens_is_one_line_that_expands(site, browser):
    served, ids = site
    page = _page(browser, DESKTOP)
    page.goto(f"{served.url}/audits/{ids['unreachable']}")
    blocks = page.locator(".ports .block")
    assert blocks.count() == 5  # 3 mail ports, 2 proxy ports: one block each
    quiet = page.locator(".ports details.block-quiet")
    assert quiet.count() == 5
    first = quiet.first
    line = first.locator(":scope > summary").inner_text()
    assert re.fullmatch(r"127\.0\.0\.1 port \d+ · Mail relay: nothing listens — nothing to do", line), line
    rows = first.locator("li.check")
    assert rows.count() == 22 and not rows.first.is_visible()  # collapsed: one line
    first.locator(":scope > summary").click()
    assert rows.first.is_visible() and rows.nth(21).is_visible()  # expanded: every variant, with its dialogue
    rows.first.locator("details.dialogue summary").click()
    assert "connecting to 127.0.0.1" in rows.first.locator("pre.transcript").inner_text()
    page.context.close()


def test_an_open_relay_shows_each_open_variant_with_its_evidence_and_collapses_the_rest(site, browser):
    served, ids = site
    page = _page(browser, DESKTOP)
    page.goto(f"{served.url}/audits/{ids['relay']}")
    open_block = page.locator(".ports section.block.verdict-open")
    assert open_block.count() == 1
    findings = open_block.locator(".finding")
    assert findings.count() == 11  # the foreign-recipient variants, each on its own
    evidence = findings.first.locator("pre.evidence")
    assert evidence.is_visible()  # the first one's proof is shown without a click
    assert "ESMTP Postfix" in evidence.inner_text() and "250 2.0.0 Ok: queued" in evidence.inner_text()
    second = findings.nth(1)
    assert second.evaluate("e => e.tagName") == "DETAILS" and not second.locator("pre.evidence").is_visible()
    second.locator(":scope > summary").click()
    assert "250 2.0.0 Ok: queued" in second.locator("pre.evidence").inner_text()
    guides = open_block.locator(".meaning a")
    assert guides.first.inner_text().startswith("Postfix") and guides.count() == len(set(guides.all_inner_texts()))
    group = open_block.locator("details.group")
    assert group.count() == 1 and group.locator(":scope > summary").inner_text().startswith("11 of 22 relay attempts")
    assert not group.locator("li.check").first.is_visible()
    group.locator(":scope > summary").click()
    assert group.locator("li.check").count() == 11 and group.locator("li.check").first.is_visible()
    # the two other mail ports: one line each
    assert page.locator(".ports details.block-quiet").count() == 2
    page.context.close()


TOPS = {
    "en": (("relay", ["Mail relay: open", "Your server is Postfix: follow these 4 steps"]),
           ("proxy", ["Proxy: open", "Your server is Squid: follow these 4 steps"]),
           ("fixed", ["Mail relay: closed", "11 fixed"]),
           ("unreachable", ["Mail relay: unreachable", "Proxy: unreachable"])),
    "es": (("relay", ["Relé de correo: abierto", "Su servidor es Postfix: siga estos 4 pasos"]),
           ("proxy", ["Proxy: abierto", "Su servidor es Squid: siga estos 4 pasos"]),
           ("fixed", ["Relé de correo: cerrado", "11 corregidos"]),
           ("unreachable", ["Relé de correo: inalcanzable", "Proxy: inalcanzable"])),
}


@pytest.mark.parametrize("language", ["en", "es"])
def test_the_top_of_a_phone_screen_holds_the_verdicts_the_next_step_and_the_retest(site, browser, language):
    served, ids = site
    for state, needles in TOPS[language]:
        page = _page(browser, PHONE)
        page.goto(f"{served.url}/audits/{ids[state]}?lang={language}")
        top = page.inner_text(".summary")
        assert all(n in top for n in needles), (state, top)
        for selector in (".summary .verdict", ".summary .retest"):
            for box in (page.locator(selector).nth(i).bounding_box() for i in range(page.locator(selector).count())):
                assert box["y"] + box["height"] <= PHONE["height"], (state, selector, box)
        if state in ("relay", "proxy"):
            link = page.locator(".next-step a")
            assert "#fix" in link.get_attribute("href") and "audit=" in link.get_attribute("href")
        page.context.close()


PAGES = ["/", "/start", "/guides", "/guides/postfix", "/guides/exchange", "/verify", "/privacy", "/about"]
STATES = ["unreachable", "relay", "proxy", "fixed", "running", "interrupted"]


def _overflow(page: Any) -> int:
    return page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


@pytest.mark.parametrize("language", ["en", "es"])
def test_no_page_scrolls_sideways_on_a_phone(site, browser, language):
    served, ids = site
    page = _page(browser, PHONE)
    wide = {}
    for path in PAGES + [f"/audits/{ids[s]}" for s in STATES]:
        page.goto(f"{served.url}{path}?lang={language}")
        for opened in page.locator("details:not([open]) > summary").all()[:30]:  # opened, too: transcripts wrap
            if opened.is_visible():
                opened.click()
        if _overflow(page) > 0:
            wide[path] = _overflow(page)
    page.context.close()
    assert wide == {}


TAP_TARGETS = """() => {
  const small = [];
  for (const el of document.querySelectorAll('a, button, summary, input:not([type=hidden]), select, label')) {
    const target = el.closest('label') && el.tagName === 'INPUT' ? el.closest('label') : el;
    const box = target.getBoundingClientRect();
    if (box.width === 0 || box.right <= 0 || getComputedStyle(target).visibility === 'hidden') continue;
    // a link inside a sentence is exempt (WCAG 2.5.5); a link on its own line is a target
    if (el.tagName === 'A' && el.parentElement.textContent.trim() !== el.textContent.trim()) continue;
    if (el.tagName === 'LABEL' && !el.querySelector('input')) continue;
    if (box.height < 44 || box.width < 44) small.push(el.tagName + ' ' + el.textContent.trim().slice(0, 40)
                                                       + ' ' + Math.round(box.width) + 'x' + Math.round(box.height));
  }
  return small;
}"""


def test_tap_targets_are_at_least_44_px_on_a_phone(site, browser):
    served, ids = site
    page = _page(browser, PHONE)
    small = {}
    for path in PAGES + [f"/audits/{ids[s]}" for s in ("relay", "fixed")]:
        page.goto(served.url + path)
        found = page.evaluate(TAP_TARGETS)
        if found:
            small[path] = found[:5]
    page.context.close()
    assert small == {}


def test_screenshots_and_the_printed_report(site, browser):
    served, ids = site
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for state in ("unreachable", "relay", "proxy", "fixed"):
        for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page = _page(browser, viewport)
            page.goto(f"{served.url}/audits/{ids[state]}")
            page.screenshot(path=str(ARTIFACTS / f"result-{state}-{name}.png"), full_page=name == "desktop")
            if name == "phone":  # the first screen, then the whole page, then the first screen in Spanish
                page.screenshot(path=str(ARTIFACTS / f"result-{state}-phone-full.png"), full_page=True)
                page.goto(f"{served.url}/audits/{ids[state]}?lang=es")
                page.screenshot(path=str(ARTIFACTS / f"result-{state}-phone-es.png"))
            page.context.close()
        page = _page(browser, DESKTOP)
        page.goto(f"{served.url}/audits/{ids[state]}")
        pdf = page.pdf(format="A4", print_background=True)
        (ARTIFACTS / f"result-{state}.pdf").write_bytes(pdf)
        page.emulate_media(media="print")
        printed = page.inner_text("body")
        page.context.close()
        pages = len(re.findall(rb"/Type\s*/Page\b", pdf))
        assert 1 <= pages <= 2, (state, pages)
        assert f"{served.url}/audits/{ids[state]}" in printed  # the permalink
        assert "Test engine" in printed and "127.0.0.1" in printed
        assert "Re-test" not in printed and "Test my server" not in printed  # no buttons, no navigation
        if state == "relay":
            assert "ESMTP Postfix" in printed and "250 2.0.0 Ok: queued" in printed  # the open port's evidence


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_no_serious_or_critical_accessibility_violation_in_any_state(site, browser, viewport):
    from browser_support import AXE
    from support import require_binary

    if not AXE.exists():
        require_binary(str(AXE), "axe-core from the npm registry (make test runs npm ci)")
    served, ids = site
    page = _page(browser, viewport, bypass_csp=True)  # to inject axe-core; the site's own CSP forbids it
    bad = {}
    for state in STATES:
        page.goto(f"{served.url}/audits/{ids[state]}")
        for summary in page.locator(".ports .block > details > summary, .ports details.block > summary").all()[:10]:
            if summary.is_visible():
                summary.click()  # the expanded rows too
        page.add_script_tag(path=str(AXE))
        result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        found = [{"id": v["id"], "nodes": [n["target"] for n in v["nodes"]][:3]} for v in result["violations"]
                 if v["impact"] in ("serious", "critical")]
        if found:
            bad[state] = found
    page.context.close()
    assert bad == {}
