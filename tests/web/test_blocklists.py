"""The blocklist service the whole way: requested alone through the API (the quick answer), beside an open proxy found
by the real proxy checks, the result page's section (listings, what our verdicts explain, the way off), the
plain-text summary, and a re-test that shows the listings that went away. DNS is the test's own loopback server."""

from __future__ import annotations

from fakes import proxy as proxy_fakes
from fakes.dns import FakeDns
import pytest
from openapi_check import assert_fits, ref
from support import free_port, running_app, wait_done

pytestmark = pytest.mark.both_stores  # the rows and the cache on SQLite and on PostgreSQL

ZEN = "1.0.0.127.zen.spamhaus.org"
DRONEBL = "1.0.0.127.dnsbl.dronebl.org"
LISTED = {(ZEN, "A"): ["127.0.0.4"], (ZEN, "TXT"): ['"https://check.spamhaus.org/query/ip/127.0.0.1"'],
          (DRONEBL, "A"): ["127.0.0.9"]}


def rows_of(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"] if c["service"] == "blocklist"}


async def test_checks_blocklist_alone_gives_the_quick_answer(settings):
    async with FakeDns(LISTED) as dns_server:
        settings.dns_servers = [dns_server.server]
        async with running_app(settings) as client:
            response = await client.post("/api/v1/audits/self", json={"checks": ["blocklist"]})
            assert response.status_code == 202
            data = await wait_done(client, response.json()["id"])
            openapi = (await client.get("/openapi.json")).json()
    assert data["summary"] == {"relay": None, "proxy": None, "blocklist": "listed"}
    assert data["services"] == ["blocklist"] and len(data["checks"]) == 8
    assert_fits(data, openapi, ref("Audit"))
    rows = rows_of(data)
    zen = rows["blocklist.spamhaus-zen"]
    assert zen["port"] is None and zen["verdict"] == "listed" and zen["reason"] == "listed_exploited"
    assert zen["codes"] == ["127.0.0.4"] and zen["txt"] == ["https://check.spamhaus.org/query/ip/127.0.0.1"]
    assert zen["removal_url"] == "https://check.spamhaus.org/"
    assert [g["slug"] for g in zen["guides"]] == ["blocklists"]  # "Getting off blocklists"
    assert rows["blocklist.spamcop"]["guides"] == []
    assert rows["blocklist.dronebl"]["reason"] == "listed_proxy"
    assert rows["blocklist.spamcop"]["verdict"] == "not_listed" and rows["blocklist.spamcop"]["codes"] == []
    # only our own DNS server was asked, only about the requester's address
    assert {name for name, _ in dns_server.queries} <= {f"1.0.0.127.{zone}" for zone in (
        "zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org", "dnsbl-1.uceprotect.net",
        "psbl.surriel.com", "bl.mailspike.net", "dnsbl.dronebl.org", "rbl.efnetrbl.org")}


async def test_a_list_that_refuses_our_resolver_is_inconclusive_and_says_so(settings):
    async with FakeDns({(ZEN, "A"): ["127.255.255.254"]}) as dns_server:
        settings.dns_servers = [dns_server.server]
        async with running_app(settings) as client:
            audit_id = (await client.post("/api/v1/audits/self", json={"checks": ["blocklist"]})).json()["id"]
            data = await wait_done(client, audit_id)
            page = (await client.get(f"/audits/{audit_id}")).text
    assert data["summary"]["blocklist"] == "inconclusive"
    zen = rows_of(data)["blocklist.spamhaus-zen"]
    assert (zen["verdict"], zen["reason"]) == ("inconclusive", "list_refused_query")
    assert "refuses queries from our resolver" in page and "listed_" not in page


async def test_the_page_explains_listings_by_our_open_proxy_and_a_retest_shows_what_went_away(settings):
    async with FakeDns(LISTED) as dns_server, proxy_fakes.ForwardingProxy() as proxy:
        settings.dns_servers = [dns_server.server]
        settings.relay_ports, settings.proxy_ports = [], [proxy.port]
        settings.canary_http_listen = f"127.0.0.1:{free_port()}"
        settings.canary_smtp_listen, settings.canary_tls_listen = "127.0.0.1:0", "127.0.0.1:0"
        settings.canary_name, settings.proxy_step_timeout = "localhost", 3
        settings.blocklist_cache_seconds = 0  # the re-test asks the lists again
        async with running_app(settings) as client:
            first = (await client.post("/api/v1/audits/self", json={"checks": ["proxy", "blocklist"]})).json()["id"]
            data = await wait_done(client, first, seconds=60)
            assert data["summary"] == {"relay": None, "proxy": "open", "blocklist": "listed"}
            page = (await client.get(f"/audits/{first}")).text
            text = (await client.get(f"/audits/{first}/summary.txt")).text
            dns_server.remove(DRONEBL, "A")  # the owner closed the proxy and asked DroneBL for removal
            second = (await client.post(f"/api/v1/audits/{first}/retest")).json()["id"]
            again = await wait_done(client, second, seconds=60)
            retest_page = (await client.get(f"/audits/{second}")).text
    section = page.split('id="blocklists"', 1)[1].split("</section>", 1)[0]
    assert section.count('class="listing verdict-listed"') == 2
    assert section.count("Our test found an open proxy on this address") == 2  # XBL and DroneBL's HTTP proxy
    assert 'href="https://check.spamhaus.org/"' in section and 'href="https://dronebl.org/lookup"' in section
    assert "XBL: Exploits Block List" in section and "HTTP proxy: open HTTP proxy" in section
    # both explained by the open proxy; DroneBL needs a request, ZEN (XBL) removes by itself: DroneBL first
    assert section.index("<h3>DroneBL") < section.index("<h3>Spamhaus ZEN")
    assert 'href="/guides/blocklists"' in section
    assert "Listed by Spamhaus ZEN: 127.0.0.1, 127.0.0.4 (XBL)" in text and "Removal: https://dronebl.org/lookup" in text
    assert "Our test found an open proxy, which explains this listing" in text
    changes = {name: row["change"] for name, row in rows_of(again).items()}
    assert changes["blocklist.dronebl"] == "delisted" and changes["blocklist.spamhaus-zen"] == "still_listed"
    assert changes["blocklist.spamcop"] is None
    gone = retest_page.split('class="notice notice-good delisted"', 1)[1].split("</div>", 1)[0]
    assert "No longer listed since your previous test" in gone and "blocklist.dronebl" in gone
    assert "blocklist.spamhaus-zen" not in gone
