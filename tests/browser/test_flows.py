"""The visitor's journey in Debian's chromium: an open relay found, its guide, the guide's fix applied to a
Postfix-like fake, the re-test; without JavaScript too; and the accessibility of every kind of page (axe-core,
serious and critical)."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from pathlib import Path

import pytest
from browser_support import AXE, ThreadedServer, screenshot
from fakes import smtp as fakes
from support import ServedSite, require_binary

POSTFIX_BANNER = b"220 mx.corp.test ESMTP Postfix (Debian/GNU)\r\n"


class SwitchableRelay(fakes.OpenRelay):
    """A Postfix-looking server that relays until its owner fixes it."""

    banner = POSTFIX_BANNER
    open = True

    def rcpt(self, conn, arg):
        return super().rcpt(conn, arg) if self.open else fakes.Policy.rcpt(self, conn, arg)


class PostfixMainCf(fakes.OpenRelay):
    """A Postfix-looking fake whose relay decision follows its `main.cf` settings, the way Postfix reads them:
    `smtpd_relay_restrictions` (or, when empty, `smtpd_recipient_restrictions`) left to right, where
    `permit_mynetworks` permits a client inside `mynetworks`, `permit_sasl_authenticated` needs a login (we never log
    in), `reject_unauth_destination` refuses a foreign recipient, `permit` permits, and the end of the list permits.
    Only these settings and restrictions are modelled. The client is taken to be `client_address`, an outside
    address: the site reaches real servers from the Internet, while here it comes from loopback, which every
    correct `mynetworks` trusts."""

    banner = POSTFIX_BANNER
    client_address = ipaddress.ip_address("203.0.113.25")

    def __init__(self, main_cf: dict[str, str]) -> None:
        super().__init__()
        self.main_cf = dict(main_cf)

    def apply(self, snippet: str) -> None:
        """Set the `name = value` lines of a main.cf snippet, as an editor of main.cf would."""
        for line in snippet.splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                self.main_cf[name.strip()] = value.strip()

    def _trusted(self) -> bool:
        for item in re.split(r"[\s,]+", self.main_cf.get("mynetworks", "")):
            if item:
                network = ipaddress.ip_network(item.replace("[", "").replace("]", ""), strict=False)
                if network.version == self.client_address.version and self.client_address in network:
                    return True
        return False

    def relays(self) -> bool:
        restrictions = self.main_cf.get("smtpd_relay_restrictions", "") or self.main_cf.get(
            "smtpd_recipient_restrictions", "")
        for restriction in re.split(r"[\s,]+", restrictions):
            if restriction == "permit_mynetworks" and self._trusted() or restriction == "permit":
                return True
            if restriction == "reject_unauth_destination":
                return False  # every recipient of our probes is foreign
        return True

    def rcpt(self, conn, arg):
        return super().rcpt(conn, arg) if self.relays() else fakes.Policy.rcpt(self, conn, arg)


# the first bad value the Postfix guide's Check names: "mynetworks contains addresses that are not yours"
OPEN_MAIN_CF = {"mynetworks": "0.0.0.0/0",
                "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"}


def guide_fix_snippet(slug: str, validator: str) -> str:
    """The first configuration block of the guide's Fix section, as shipped in guides/."""
    from app.guides import GuideLibrary

    guide = GuideLibrary(Path(__file__).resolve().parents[2] / "guides").get(slug)
    text = guide.body
    fix_starts = text.index("\n## Fix\n")
    fix_ends = text.index("\n## ", fix_starts + 1)
    blocks = [b for b in guide.blocks if b.validate == validator and b.content in text[fix_starts:fix_ends]]
    assert blocks, f"no {validator} block in the Fix of {slug}"
    return blocks[0].content


def test_the_fix_model_follows_postfix_rules():
    relay = PostfixMainCf(OPEN_MAIN_CF)
    assert relay.relays()
    relay.apply("mynetworks = 127.0.0.0/8 [::1]/128")
    assert not relay.relays()
    relay.apply("smtpd_relay_restrictions = permit_mynetworks, permit, reject_unauth_destination")
    assert relay.relays()
    relay.apply("smtpd_relay_restrictions =\nsmtpd_recipient_restrictions = reject_unauth_destination, permit")
    assert not relay.relays()


def site_env(relay_port: int) -> dict[str, str]:
    return {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(relay_port), "SECURE_PROXY_PORTS": "",
            "SECURE_TARGET_COOLDOWN": "0", "SECURE_CONNECT_TIMEOUT": "2"}


def test_open_relay_then_the_guides_fix_applied_then_retest_shows_fixed(tmp_path, browser_page):
    """The visitor finds an open relay, opens the Postfix guide from the result, applies the guide's Fix (its
    main.cf lines, read from guides/relay/postfix.md, set in the fake's main.cf), re-tests and sees it closed."""
    page = browser_page
    relay = PostfixMainCf(OPEN_MAIN_CF)
    with ThreadedServer(fakes.FakeSmtpServer(relay)) as fake, ServedSite(tmp_path, site_env(fake.port)) as site:
        page.goto(site.url + "/start")
        page.get_by_role("button", name="Test my server at 127.0.0.1").click()
        page.wait_for_selector("#status:text('done')", timeout=30000)
        assert "Mail relay: open" in page.inner_text(".summary")
        assert "Your server accepted mail for a stranger's address" in page.inner_text(".summary")
        screenshot(page, "relay-open")
        guide = page.locator("a[href*='/guides/postfix']").first
        assert "#fix" in guide.get_attribute("href")
        guide.click()
        page.wait_for_url("**/guides/postfix*")
        assert "Postfix" in page.inner_text("h1")
        assert "You came here from your test result" in page.inner_text("main")
        relay.apply(guide_fix_snippet("postfix", "postfix-main"))  # the owner applies the guide's Fix
        page.get_by_role("link", name="go back to your result").click()
        page.get_by_role("button", name="Re-test 127.0.0.1").click()
        page.wait_for_selector("#status:text('done')", timeout=30000)
        assert "We found no open relay" in page.inner_text(".summary")
        # the 11 forms addressed to the server itself were local deliveries, not open (the fake delivers nothing)
        assert "11 fixed" in page.inner_text(".changes")
        screenshot(page, "relay-fixed")
    assert [p for p in page.problems if "Content Security Policy" in p] == []


def test_without_javascript_the_page_refreshes_itself_to_done(tmp_path, browser):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    relay = SwitchableRelay()
    relay.open = False
    with ThreadedServer(fakes.FakeSmtpServer(relay)) as fake, ServedSite(tmp_path, site_env(fake.port)) as site:
        page.goto(site.url + "/start")
        page.get_by_role("button", name="Test my server at 127.0.0.1").click()
        page.wait_for_url("**/audits/*")
        page.wait_for_selector(".summary", timeout=30000)  # the meta refresh brought the finished page
        assert "We found no open relay" in page.inner_text(".summary")
        screenshot(page, "no-js-done")
    context.close()


@pytest.mark.parametrize("path", ["/", "/start", "/guides", "/guides/postfix", "/about", "/privacy", "/verify",
                                  "AUDIT"])
def test_no_serious_or_critical_accessibility_violation(tmp_path, browser, path):
    if not AXE.exists():
        require_binary(str(AXE), "axe-core from the npm registry (make test runs npm ci)")
    context = browser.new_context(bypass_csp=True)  # to inject axe-core; the site's own CSP forbids it
    page = context.new_page()
    relay = SwitchableRelay()
    with ThreadedServer(fakes.FakeSmtpServer(relay)) as fake, ServedSite(tmp_path, site_env(fake.port)) as site:
        if path == "AUDIT":
            page.goto(site.url + "/start")
            page.get_by_role("button", name="Test my server at 127.0.0.1").click()
            page.wait_for_selector("#status:text('done')", timeout=30000)
        else:
            page.goto(site.url + path)
        page.add_script_tag(path=str(AXE))
        result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    context.close()
    bad = [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert bad == [], json.dumps(bad, indent=1)


def test_the_spanish_interface(tmp_path, browser):
    context = browser.new_context(locale="es-ES")  # the browser asks for Spanish (Accept-Language)
    page = context.new_page()
    relay = SwitchableRelay()
    relay.open = False
    with ThreadedServer(fakes.FakeSmtpServer(relay)) as fake, ServedSite(tmp_path, site_env(fake.port)) as site:
        page.goto(site.url + "/")
        assert page.get_attribute("html", "lang") == "es"
        assert "Did you receive a letter" not in page.inner_text("main")
        page.goto(site.url + "/start")
        page.locator(".start-form button[type=submit]").click()
        page.wait_for_selector(".summary", timeout=30000)
        summary = page.inner_text(".summary")
        assert "cerrado" in summary.lower() and "We found no open relay" not in summary
        screenshot(page, "spanish-result")
        page.get_by_role("link", name="English").click()
        assert page.get_attribute("html", "lang") == "en"
        assert "We found no open relay" in page.inner_text(".summary")
    context.close()


def test_domain_verification_flow_against_the_test_dns_server(tmp_path, browser_page, refused_port):
    from fakes.dns import FakeDns

    page = browser_page
    dns = FakeDns()
    with ThreadedServer(dns) as dns_thread:
        env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_DNS_SERVERS": f"127.0.0.1:{dns_thread.port}",
               "SECURE_RELAY_PORTS": str(refused_port), "SECURE_PROXY_PORTS": "", "SECURE_TARGET_COOLDOWN": "0",
               "SECURE_VERIFICATION_CHECK_INTERVAL": "1"}
        with ServedSite(tmp_path, env) as site:
            page.goto(site.url + "/start")
            page.get_by_role("link", name="prove that you control its domain").click()
            page.fill("#domain", "Corp.Test")
            page.get_by_role("button", name="Get my code").click()
            page.wait_for_url("**/verify/*")
            value = page.locator("code", has_text="secure-your-server-verification=").inner_text()
            page.get_by_role("button", name="Check now").click()
            assert "no TXT record" in page.inner_text("main")
            set_records = {("_secure-your-server.corp.test", "TXT"): [f'"{value}"'], ("corp.test", "A"): ["127.0.0.61"]}
            for (name, rdtype), values in set_records.items():
                dns_thread.loop.call_soon_threadsafe(dns.set, name, rdtype, values)
            page.get_by_role("button", name="Check now").click()  # at once: one check a second at most
            assert "Wait a few seconds, then check again" in page.inner_text("main")
            time.sleep(1.1)
            page.get_by_role("button", name="Check now").click()
            assert "corp.test is verified" in page.inner_text("main")
            screenshot(page, "domain-verified")
            page.get_by_role("button", name="Test corp.test").click()
            page.wait_for_url("**/audits/*")
            page.wait_for_selector("#status:text('done')", timeout=30000)
            assert "127.0.0.61" in page.inner_text("h1")
            assert "Mail relay: unreachable" in page.inner_text(".summary")


def test_a_dual_stack_visitor_learns_the_other_address(tmp_path, browser_page):
    from support import free_port

    page = browser_page
    main_port = free_port()
    main_url = f"http://127.0.0.1:{main_port}"
    # the "IPv6-only" name of the same site: here another loopback port, with the main site as its public URL
    (tmp_path / "other").mkdir()
    with ServedSite(tmp_path / "other", {"SECURE_PUBLIC_URL": main_url}) as other, \
            ServedSite(tmp_path, {"SECURE_IPV6_URL": other.url}, port=main_port) as site:
        page.goto(site.url + "/start")
        page.wait_for_selector("#other-found:not([hidden])", timeout=10000)
        assert "127.0.0.1" in page.inner_text("#other-found")
        assert page.get_attribute("#other-family a", "href") == other.url + "/start"
    assert [p for p in page.problems if "Content Security Policy" in p] == []
