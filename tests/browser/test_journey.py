"""A visitor in a real browser (Debian's chromium through Playwright): home, start a test, watch it finish."""

from __future__ import annotations

from support import ARTIFACTS, ServedSite

def test_home_start_and_audit_done(tmp_path, browser_page, refused_port, open_port, silent_port):
    page = browser_page
    # the silent port keeps the audit running for 2 s, so the page shows progress and follows the event stream
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": f"{open_port},{silent_port}", "SECURE_CONNECT_TIMEOUT": "2"}
    with ServedSite(tmp_path, env) as site:
        page.goto(site.url + "/")
        assert "Did you receive a letter" in page.inner_text("h1")
        page.click("text=Test my server")
        page.wait_for_url("**/start")
        button = page.get_by_role("button", name="Test my server at 127.0.0.1")
        button.click()
        page.wait_for_url("**/audits/*")
        assert page.locator("#progress").count() == 1  # still running: the live progress is shown
        # the page follows the event stream and reloads itself when the audit is done
        page.wait_for_selector("#status:text('done')", timeout=30000)
        summary = page.inner_text(".summary")
        assert "Mail relay: unreachable" in summary
        assert "Proxy: inconclusive" in summary
        # one block per port: the refused mail port is one line over its 22 variants
        assert page.locator(".ports .block").count() == 1 + 2
        relay = page.locator(".ports details.block-quiet", has_text="Mail relay")
        assert "nothing listens" in relay.locator(":scope > summary").inner_text()
        assert relay.locator("li.check").count() == 22
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "audit-done.png"), full_page=True)
        # the dialogue is there, escaped, behind a disclosure
        relay.locator(":scope > summary").click()
        relay.locator("li.check details.dialogue > summary").first.click()
        assert "connecting to 127.0.0.1" in relay.locator("pre.transcript").first.inner_text()
        page.goto(site.url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=20000)
    csp_errors = [p for p in page.problems if "Content Security Policy" in p]
    assert csp_errors == []
    assert [p for p in page.problems if "Error" in p] == []  # audit.js followed the stream without a script error
