"""The site as an operator runs it: `secure-your-server serve` in its own process, on loopback."""

import asyncio
import subprocess

import httpx
import pytest
from support import ServedSite, free_port, wait_done_sync

from app.store import Store

TWO = {"checks": ["relay", "proxy"]}  # the probed services (these tests count their rows)


def test_self_audit_over_real_http(tmp_path, refused_port, open_port):
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": str(open_port), "SECURE_CONNECT_TIMEOUT": "2"}
    with ServedSite(tmp_path, env) as site:
        response = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5)
        assert response.status_code == 202
        data = wait_done_sync(site.url, response.json()["id"])
        assert data["status"] == "done"
        assert {(c["port"], c["reason"]) for c in data["checks"]} == {(refused_port, "refused"),
                                                                    (open_port, "port_open")}
        assert len(data["checks"]) == 23
        # uvicorn's proxy-header handling is off: a header from a loopback peer does not pick the target
        response = httpx.post(site.url + "/api/v1/audits/self", json=TWO, headers={"X-Forwarded-For": "8.8.8.8"},
                               timeout=5)
        assert wait_done_sync(site.url, response.json()["id"])["hosts"] == ["127.0.0.1"]
    log = site.log.read_text()
    assert '"event": "audit.done"' in log and '"event": "audit.created"' in log


def test_self_audit_without_allow_networks_is_403(tmp_path):
    with ServedSite(tmp_path, {"SECURE_ALLOW_NETWORKS": ""}) as site:
        response = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5)
        assert response.status_code == 403
        assert "public Internet" in response.json()["detail"]


def test_the_site_never_tests_its_own_port(tmp_path, refused_port, open_port):
    own = free_port()
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": f"{own},{open_port}"}
    with ServedSite(tmp_path, env, port=own) as site:
        audit_id = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5).json()["id"]
        data = wait_done_sync(site.url, audit_id)
        assert {c["port"] for c in data["checks"]} == {refused_port, open_port}



@pytest.mark.parametrize("sink_host", ["127.0.0.1", "0.0.0.0"])
def test_the_site_never_tests_its_own_sink(tmp_path, refused_port, sink_host):
    """Issue 10: the sink is one of the site's listeners; a self audit from its address skips its port."""
    sink = free_port()
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_SINK_LISTEN": f"{sink_host}:{sink}",
           "SECURE_PROBE_DOMAIN": "sink.test.example", "SECURE_RELAY_PORTS": f"{sink},{refused_port}",
           "SECURE_PROXY_PORTS": f"{sink},{refused_port}", "SECURE_CONNECT_TIMEOUT": "2"}
    with ServedSite(tmp_path, env) as site:
        audit_id = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5).json()["id"]
        data = wait_done_sync(site.url, audit_id)
    assert data["status"] == "done"
    assert {(c["service"], c["port"]) for c in data["checks"]} == {("relay", refused_port), ("proxy", refused_port)}
    assert f"{sink_host}:{sink}" in site.log.read_text()  # the sink did listen there

def test_kill_9_mid_audit_loses_nothing_and_marks_it_interrupted(tmp_path, refused_port, open_port, silent_port):
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": f"{open_port},{silent_port}", "SECURE_CONNECT_TIMEOUT": "60"}
    site = ServedSite(tmp_path, env)
    try:
        audit_id = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5).json()["id"]
        for _ in range(100):  # bounded: the two quick checks land within a few hundred ms
            data = httpx.get(f"{site.url}/api/v1/audits/{audit_id}", timeout=5).json()
            if len(data["checks"]) == 23:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert data["status"] == "running" and len(data["checks"]) == 23
    finally:
        site.stop(kill=True)
    assert site.process.returncode == -9

    async def inspect() -> tuple[str, int, int]:
        store = Store(str(site.db))
        await store.open()
        before = await store.get_audit(audit_id)
        count = await store.interrupt_orphaned(0)  # the killed instance's heartbeat is as old as it gets: gone
        after = await store.get_audit(audit_id)
        await store.close()
        assert before.status == "running"
        return after.status, len(after.checks), count

    status, checks, count = asyncio.run(inspect())
    assert (status, checks, count) == ("interrupted", 23, 1)


def test_restart_marks_unfinished_audits_interrupted(tmp_path, refused_port, silent_port):
    """After a crash the next instance cannot tell a dead process from a live one until its heartbeat is older than
    SECURE_INSTANCE_STALE_SECONDS (here 1 s): then, at start or in its periodic sweep, the audit is interrupted."""
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": f"{refused_port},{silent_port}",
           "SECURE_PROXY_PORTS": str(refused_port), "SECURE_CONNECT_TIMEOUT": "60",
           "SECURE_INSTANCE_STALE_SECONDS": "1"}
    site = ServedSite(tmp_path, env)
    audit_id = httpx.post(site.url + "/api/v1/audits/self", json=TWO, timeout=5).json()["id"]
    site.stop(kill=True)
    with ServedSite(tmp_path, env) as again:
        data = wait_done_sync(again.url, audit_id, seconds=30)  # bounded: within 2 bounds and a beat
        assert data["status"] == "interrupted"
        assert "restarted" in data["error"]
