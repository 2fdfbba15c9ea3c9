import re

import pytest
from support import running_app, wait_done

from app.web.security import CSRF_COOKIE


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


@pytest.mark.parametrize("path,needle", [
    ("/", "Did you receive a letter"), ("/start", "Test my server at 127.0.0.1"), ("/guides", "What is an open"),
    ("/guides/what-is-an-open-relay", "RFC 5321"), ("/privacy", "For how long"),
])
async def test_pages_render(client, path, needle):
    response = await client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert needle in response.text


async def test_home_lists_partners_from_the_data_file(settings, tmp_path):
    partners = tmp_path / "partners.json"
    partners.write_text('{"partners": [{"name": "Agence <Test>", "country": "FR", "url": "https://example.org/"}]}')
    settings.partners_file = str(partners)
    settings.contact_email = "help@example.org"
    async with running_app(settings) as client:
        html = (await client.get("/")).text
    assert "Agence &lt;Test&gt;" in html and "help@example.org" in html


async def test_security_headers_on_pages_api_and_errors(client):
    for path in ("/", "/api/v1/reasons", "/missing", "/api/v1/audits/missing", "/static/style.css"):
        response = await client.get(path)
        csp = response.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in response.headers


async def test_hsts_when_served_over_https(settings):
    settings.public_url = "https://audit.example.org"
    async with running_app(settings) as client:
        response = await client.get("/")
    assert response.headers["strict-transport-security"].startswith("max-age=")


async def test_no_inline_script_or_style_in_pages(client):
    for path in ("/", "/start", "/guides", "/privacy"):
        html = (await client.get(path)).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
        assert " style=" not in html and "<style" not in html and " on" + "click=" not in html


async def test_404_and_errors_are_html_pages_outside_the_api(client):
    response = await client.get("/no-such-page")
    assert response.status_code == 404 and "Page not found" in response.text
    response = await client.get("/audits/AAAAAAAAAAAAAAAAAAAAAA")
    assert response.status_code == 404 and "<html" in response.text


async def test_500_page_has_security_headers(settings):
    async with running_app(settings) as client:
        app = client.app

        @app.get("/boom")
        async def boom():
            raise RuntimeError("secret-internal-detail")

        transport = client._transport
        transport.raise_app_exceptions = False
        response = await client.get("/boom")
        assert response.status_code == 500 and "Internal error" in response.text
        assert "secret-internal-detail" not in response.text
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


async def test_start_form_needs_a_valid_csrf_token(client):
    page = await client.get("/start")
    token = csrf_of(page.text)
    assert CSRF_COOKIE in page.cookies or client.cookies.get(CSRF_COOKIE)
    response = await client.post("/start", data={"csrf": "0" * 64, "checks": ["relay"]})
    assert response.status_code == 403
    response = await client.post("/start", data={"csrf": token, "checks": ["relay"]},
                                 headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    response = await client.post("/start", data={"csrf": token, "checks": ["relay"]})
    assert response.status_code == 303
    audit_url = response.headers["location"]
    audit_id = audit_url.rsplit("/", 1)[1]
    data = await wait_done(client, audit_id)
    assert data["services"] == ["relay"]
    page = await client.get(audit_url)
    assert "We found no open relay" not in page.text  # refused only: unreachable, not closed
    assert "No mail port answered" in page.text
    assert "Re-test 127.0.0.1" in page.text


async def test_start_form_for_a_private_address_explains_and_does_not_start(settings):
    settings.allow_networks = []
    async with running_app(settings) as client:
        token = csrf_of((await client.get("/start")).text)
        response = await client.post("/start", data={"csrf": token, "checks": ["relay", "proxy"]})
    assert response.status_code == 403
    assert "We cannot test this address" in response.text and "public Internet" in response.text


async def test_retest_form_and_chain(client):
    token = csrf_of((await client.get("/start")).text)
    first = (await client.post("/start", data={"csrf": token})).headers["location"].rsplit("/", 1)[1]
    await wait_done(client, first)
    response = await client.post(f"/audits/{first}/retest", data={"csrf": token})
    assert response.status_code == 303
    second = response.headers["location"].rsplit("/", 1)[1]
    await wait_done(client, second)
    page = (await client.get(f"/audits/{second}")).text
    assert f'href="/audits/{first}"' in page


async def test_running_audit_page_refreshes_without_js(settings, silent_port):
    settings.proxy_ports = [silent_port]
    settings.connect_timeout = 5
    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        html = (await client.get(f"/audits/{audit_id}")).text
    assert '<noscript><meta http-equiv="refresh"' in html and "audit.js" in html


async def test_transcripts_are_escaped_on_the_page(settings):
    from app.verdicts import CheckResult, TranscriptLine, Verdict

    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        store = client.app.state.sys.store
        await store.add_check(audit_id, 99, CheckResult(
            "relay", "127.0.0.1", 25, "relay.reachable", Verdict.INCONCLUSIVE, "port_open",
            transcript=[TranscriptLine(0.1, "in", "220 <script>alert(1)</script>")]))
        html = (await client.get(f"/audits/{audit_id}")).text
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_a_relay_rows_dialogue_says_whose_greeting_it_is(settings):
    """A visitor whose provider answers on their address must be able to tell: the relay row's dialogue says the
    greeting is from the server that answered on their address, and links the guide on which address it saw."""
    from app.verdicts import CheckResult, TranscriptLine, Verdict

    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        store = client.app.state.sys.store
        await store.add_check(audit_id, 99, CheckResult(
            "relay", "127.0.0.1", 25, "relay.reachable", Verdict.INCONCLUSIVE, "port_open",
            transcript=[TranscriptLine(0.1, "in", "220 smtp.provider.example ESMTP")]))
        english = (await client.get(f"/audits/{audit_id}?lang=en")).text
        spanish = (await client.get(f"/audits/{audit_id}?lang=es")).text
    assert english.count("the server that answered on your address") == 1
    assert 'href="/guides/source-address"' in english
    assert spanish.count("del servidor que respondió en su") == 1 and 'href="/guides/source-address"' in spanish


async def test_guides_index_filter_works_without_js(client):
    everything = (await client.get("/guides")).text
    assert "What is an open mail relay?" in everything
    only = (await client.get("/guides", params={"q": "malware"})).text
    assert "A computer infected with proxy malware" in only and "What is an open mail relay?" not in only
    none = (await client.get("/guides", params={"q": "no-such-thing-anywhere"})).text
    assert "No guide matches" in none
    junk = await client.get("/guides", params={"service": "<script>", "q": "<b>x</b>"})
    assert junk.status_code == 200 and "<b>x</b>" not in junk.text


async def test_guides_api(client):
    listing = (await client.get("/api/v1/guides")).json()
    slugs = {g["slug"] for g in listing}
    assert {"what-is-an-open-relay", "infected-computer"} <= slugs
    assert all(g["url"].startswith("http://testserver/guides/") for g in listing)
    one = (await client.get("/api/v1/guides/infected-computer")).json()
    assert one["html"].startswith("<h2") and one["toc"][0]["anchor"] == "what-you-see"
    assert (await client.get("/api/v1/guides/nope")).status_code == 404
    assert (await client.get("/api/v1/guides", params={"service": "mail"})).status_code == 422


async def test_a_guide_page_lists_its_causes_with_links_to_where_check_and_fix_deal_with_them(client):
    page = (await client.get("/guides/exchange")).text
    covered = page.split('id="causes-title"')[1].split("</section>")[0]
    assert "An accepted domain <code>*</code> makes Exchange accept mail for every domain" in covered
    links = re.findall(r'href="#([^"]+)"', covered)
    assert "3-list-the-accepted-domains" in links and "an-accepted-domain-" in links
    assert all(f'id="{anchor}"' in page for anchor in links), links  # every link lands on a heading of the page
    spanish = (await client.get("/guides/exchange", headers={"Accept-Language": "es"})).text
    assert "Qué cubre esta guía" in spanish
    one = (await client.get("/api/v1/guides/exchange")).json()
    assert {"id": "accepted-domain-star", "title": "An accepted domain `*` makes Exchange accept mail for every domain",
            "check": "3-list-the-accepted-domains", "fix": ["an-accepted-domain-"]} in one["causes"]
    assert (await client.get("/api/v1/guides/infected-computer")).json()["causes"] == []


def test_a_cause_title_cannot_inject_markup(tmp_path):
    from app.guides import GuideLibrary
    (tmp_path / "relay").mkdir()
    (tmp_path / "relay" / "x.md").write_text(
        "---\nslug: x\ntitle: X\nservice: relay\ncauses:\n  - {id: a, title: '<script>alert(1)</script> `x`',"
        " check: check, shows: s, fix: fix, changes: c}\n---\n## Check\ns\n## Fix\nc\n")
    html = GuideLibrary(tmp_path).get("x").cause_html["a"]
    assert "<script>" not in html and "&lt;script&gt;" in html and "<code>x</code>" in html


async def test_a_guide_opened_from_an_audit_offers_the_way_back(client):
    audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
    page = (await client.get(f"/guides/squid?audit={audit_id}")).text
    assert f'href="/audits/{audit_id}"' in page and "Re-test" in page
    for junk in ("AAAAAAAAAAAAAAAAAAAAAA", "<script>", "x" * 500):
        page = (await client.get("/guides/squid", params={"audit": junk})).text
        assert "You came here from your test result" not in page


async def test_about_page_lists_what_we_send(settings):
    settings.probe_addresses = ["198.51.100.25"]
    settings.probe_helo = "probe.example.org"
    async with running_app(settings) as client:
        page = (await client.get("/about")).text
    assert "198.51.100.25" in page and "probe.example.org" in page and "relay.v22" in page and "proxy.socks5" in page
    assert "blocklist.spamhaus-zen" in page and "<code>dnsbl.dronebl.org</code>" in page and "15\n  minutes" in page


async def test_start_page_offers_the_other_address_family(settings):
    settings.ipv6_url = "https://ipv6.audit.example"
    async with running_app(settings) as client:
        page = (await client.get("/start")).text
    assert "https://ipv6.audit.example/start" in page and "over IPv4" in page
    settings.ipv6_url = ""
    async with running_app(settings) as client:
        assert "ipv6.audit.example" not in (await client.get("/start")).text


def test_time_left_follows_the_audit_pace():
    import time as clock

    from app.store import Audit
    from app.web.pages import time_left

    audit = Audit(id="x", created_at=clock.time() - 10, status="running", target="self", requester="r", hosts=[],
                  services=["relay"], planned=10, engine_version="e", started_at=clock.time() - 10)
    assert time_left(audit) is None  # no result yet: no guess
    audit.checks = [object()] * 5  # half done in 10 s
    assert 10 <= time_left(audit) <= 12
    audit.status = "done"
    assert time_left(audit) is None
