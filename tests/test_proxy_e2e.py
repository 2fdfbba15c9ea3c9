"""The whole way for proxies: the site with its canaries, a real open and a real closed tinyproxy, over HTTP."""

import httpx
import pytest
from support import ServedSite, wait_done_sync


@pytest.mark.parametrize("kind,summary", [("open", "open"), ("restricted", "closed")])
def test_proxy_audit_over_http_against_real_tinyproxy(tmp_path, proxies, kind, summary):
    tinyproxy = proxies.tinyproxy(kind)
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": "", "SECURE_PROXY_PORTS": str(tinyproxy.port),
           "SECURE_CANARY_SMTP_LISTEN": "127.0.0.1:0", "SECURE_CANARY_TLS_LISTEN": "127.0.0.1:0",
           "SECURE_CANARY_NAME": "localhost", "SECURE_PROXY_STEP_TIMEOUT": "3"}
    with ServedSite(tmp_path, env) as site:
        response = httpx.post(site.url + "/api/v1/audits/self", json={"checks": ["proxy"]}, timeout=5)
        assert response.status_code == 202
        data = wait_done_sync(site.url, response.json()["id"])
        page = httpx.get(data["url"], timeout=5).text
    assert data["summary"] == {"relay": None, "proxy": summary, "blocklist": None}
    rows = {c["name"]: c for c in data["checks"]}
    assert set(rows) == {"proxy.http_get", "proxy.connect_smtp", "proxy.connect_tls", "proxy.http_post",
                         "proxy.socks4", "proxy.socks4a", "proxy.socks5", "proxy.https_connect"}
    if kind == "open":
        # the GET went through tinyproxy to the site's own /canary page; CONNECT reached the mail canary
        assert rows["proxy.http_get"]["reason"] == "token_returned" and rows["proxy.http_get"]["confirmed"]
        assert rows["proxy.connect_smtp"]["reason"] == "token_returned"
        assert rows["proxy.connect_smtp"]["fingerprint"]["product"] == "tinyproxy"
        assert "Your server is an open proxy" in page
    else:
        assert rows["proxy.connect_smtp"]["reason"] == "destination_denied"
        assert "We found no open proxy" in page


def test_the_site_canary_page_answers_tokens_only_for_check_ids(tmp_path):
    with ServedSite(tmp_path, {}) as site:
        ok = httpx.get(site.url + "/canary/cid0123456789abcdef", timeout=5)
        again = httpx.get(site.url + "/canary/cid0123456789abcdef", timeout=5)
        other = httpx.get(site.url + "/canary/cid0123456789abcdee", timeout=5)
        bad = httpx.get(site.url + "/canary/../../etc/passwd", timeout=5)
    assert ok.status_code == 200 and ok.text.startswith("tok") and ok.text == again.text
    assert other.text != ok.text
    assert bad.status_code == 404
