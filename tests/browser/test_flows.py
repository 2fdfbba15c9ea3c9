"""Visitors in Debian's chromium, against fakes: a finished test without JavaScript, the Spanish interface, domain
verification, a dual-stack visitor, and the accessibility of every kind of page (axe-core, serious and critical).
The journey from an open relay through its guide's Fix to "fixed" runs on a real Postfix: test_real_journey.py."""

from __future__ import annotations

import json
import time

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


def site_env(relay_port: int) -> dict[str, str]:
    return {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(relay_port), "SECURE_PROXY_PORTS": "",
            "SECURE_TARGET_COOLDOWN": "0", "SECURE_CONNECT_TIMEOUT": "2"}


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
