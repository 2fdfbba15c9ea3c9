"""The sink and canaries in a process of their own (issue 16, items 6 and 7), with real processes on one SQLite file.

`secure-your-server listeners` binds them once; `serve` processes with SECURE_LISTENERS=external bind none of them
and read what they saw from the store: an arrival at the sink confirms the row whichever process ran the check, a
canary observation reaches the process whose proxy check waits for it. `serve --workers N` runs N web processes on
one port and the listeners once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import ROOT, ServedSite, free_port, wait_done_sync

from servers.postfix import start_postfix


class ListenersProcess:
    """`secure-your-server listeners` on loopback, ready once each of `ports` greets (SMTP) or accepts."""

    def __init__(self, folder: Path, env: dict[str, str], ports: list[int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "listeners.log"
        self._log_file = open(self.log, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "listeners"], cwd=ROOT,
                                        env={**os.environ, **env}, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        for port in ports:
            while not _accepts(port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the listeners did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self._log_file.close()
        return self.process.returncode


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def smtp_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.recv(200)


def shared_env(db: Path, extra: dict[str, str]) -> dict[str, str]:
    return {"SECURE_DATABASE_URL": f"sqlite:///{db}", "SECURE_ALLOW_NETWORKS": "127.0.0.0/8",
            "SECURE_LOG_LEVEL": "INFO", "SECURE_TARGET_COOLDOWN": "0", **extra}


def two_sites(tmp_path: Path, env: dict[str, str]) -> tuple[ServedSite, ServedSite]:
    first = ServedSite(tmp_path / "a", {**env, "SECURE_LISTENERS": "external"})
    try:
        return first, ServedSite(tmp_path / "b", {**env, "SECURE_LISTENERS": "external"})
    except BaseException:
        first.stop()
        raise


def test_an_arrival_at_the_listeners_process_confirms_the_rows_of_an_audit_run_elsewhere(tmp_path, postfix_ok):
    sink_port = free_port()
    env = shared_env(tmp_path / "site.db", {
        "SECURE_RELAY_PORTS": "", "SECURE_PROXY_PORTS": "", "SECURE_SINK_LISTEN": f"127.0.0.1:{sink_port}",
        "SECURE_PROBE_DOMAIN": "sink.test.example", "SECURE_PROBE_HELO": "probe.test.example",
        "SECURE_SINK_WAIT": "10"})
    instance = start_postfix(tmp_path, "open", sink_port=sink_port)
    env["SECURE_RELAY_PORTS"] = str(instance.port)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    listeners = ListenersProcess(tmp_path / "l", env, [sink_port])
    try:
        a, b = two_sites(tmp_path, env)
        try:
            audit_id = httpx.post(a.url + "/api/v1/audits", json={"target": "self", "checks": ["relay"]},
                                  timeout=5).json()["id"]
            streamed = follow_until_done(f"{a.url}/api/v1/audits/{audit_id}/events")
            data = wait_done_sync(a.url, audit_id, seconds=90)
            seen_on_b = httpx.get(f"{b.url}/api/v1/audits/{audit_id}", timeout=5).json()
        finally:
            a.stop()
            b.stop()
    finally:
        instance.stop()
        listeners.stop()
    assert data["status"] == "done" and data["summary"] == {"relay": "open", "proxy": None, "blocklist": None}
    assert len(data["checks"]) == 22
    assert {(c["reason"], c["confirmed"]) for c in data["checks"]} == {("delivered", True)}
    assert {(c["reason"], c["confirmed"]) for c in seen_on_b["checks"]} == {("delivered", True)}
    # a follower of site A saw every row end confirmed before `done`
    assert len(streamed) == 22 and {states[-1] for states in streamed.values()} == {("delivered", True)}
    # the sink was the listeners process's: neither site bound it
    assert "sink.started" in listeners.log.read_text()
    assert "sink.started" not in a.log.read_text() + b.log.read_text()


def follow_until_done(url: str) -> dict[int, list[tuple[str, bool]]]:
    """Each row's states, in the order an event stream sent them, until `done` (the server ends it; 90 s at most)."""
    text = ""
    with httpx.stream("GET", url, timeout=90) as response:
        for chunk in response.iter_text():
            text += chunk
            if "event: done" in text:
                break
    history: dict[int, list[tuple[str, bool]]] = {}
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if lines[0] == "event: check":
            check = json.loads(lines[1].removeprefix("data: "))
            history.setdefault(check["seq"], []).append((check["reason"], check["confirmed"]))
    return history


def test_a_proxy_check_run_on_one_site_sees_the_observation_of_the_listeners_canary(tmp_path, proxies):
    tinyproxy = proxies.tinyproxy("open")
    smtp_port, tls_port = free_port(), free_port()
    env = shared_env(tmp_path / "site.db", {
        "SECURE_RELAY_PORTS": "", "SECURE_PROXY_PORTS": str(tinyproxy.port),
        "SECURE_CANARY_SMTP_LISTEN": f"127.0.0.1:{smtp_port}", "SECURE_CANARY_TLS_LISTEN": f"127.0.0.1:{tls_port}",
        "SECURE_CANARY_NAME": "localhost", "SECURE_PROXY_STEP_TIMEOUT": "3"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    listeners = ListenersProcess(tmp_path / "l", env, [smtp_port, tls_port])
    try:
        a, b = two_sites(tmp_path, env)
        try:
            response = httpx.post(a.url + "/api/v1/audits/self", json={"checks": ["proxy"]}, timeout=5)
            assert response.status_code == 202
            data = wait_done_sync(a.url, response.json()["id"], seconds=90)
        finally:
            a.stop()
            b.stop()
    finally:
        listeners.stop()
    rows = {c["name"]: c for c in data["checks"]}
    assert data["summary"] == {"relay": None, "proxy": "open", "blocklist": None}
    smtp = rows["proxy.connect_smtp"]
    assert smtp["verdict"] == "open" and smtp["reason"] == "token_returned" and smtp["confirmed"]
    # the mail canary runs in the listeners process only: its observation came to site A through the store
    assert "our canary saw it arrive from 127.0.0.1" in smtp["detail"]
    assert rows["proxy.connect_tls"]["reason"] == "token_returned"
    assert "our canary saw it arrive from 127.0.0.1" in rows["proxy.connect_tls"]["detail"]


def test_serve_with_two_workers_answers_from_both_and_binds_the_sink_once(tmp_path):
    port, sink_port = free_port(), free_port()
    env = shared_env(tmp_path / "site.db", {"SECURE_SINK_LISTEN": f"127.0.0.1:{sink_port}",
                                            "SECURE_PUBLIC_URL": f"http://127.0.0.1:{port}"})
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"],
                                   cwd=ROOT, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            instances = _instances_answering(process, f"http://127.0.0.1:{port}/healthz", log)
            greeting = smtp_greeting(sink_port)
            time.sleep(1)  # a second sink, had one been started, would have failed by now
            assert process.poll() is None, log.read_text()[-2000:]
        finally:
            process.terminate()
            code = process.wait(timeout=30)
    text = log.read_text()
    assert len(instances) == 2
    assert greeting.startswith(b"220 ")
    assert "Address already in use" not in text and "error while attempting to bind" not in text
    assert text.count("sink.started") == 1
    assert code == 0


def _instances_answering(process: subprocess.Popen, url: str, log: Path) -> set[str]:
    """The instance ids that answer `url` on fresh connections: until two differ, at most 400 requests or 60 s."""
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    for _ in range(400):
        if process.poll() is not None or time.monotonic() > deadline:
            break
        try:
            with httpx.Client(timeout=2) as client:  # a new connection each time: any worker may accept it
                answer = client.get(url, headers={"Connection": "close"})
            seen.add(answer.json()["instance"])
        except httpx.HTTPError:
            time.sleep(0.1)
        if len(seen) == 2:
            break
    assert process.poll() is None, log.read_text()[-2000:]
    return seen


@pytest.mark.parametrize("value", ["127.0.0.1:0"])
def test_external_listeners_need_fixed_ports(tmp_path, value):
    """A site cannot learn a port another process chose at bind time: it refuses to start."""
    site_log = tmp_path / "site.log"
    env = shared_env(tmp_path / "site.db", {"SECURE_LISTENERS": "external", "SECURE_SINK_LISTEN": value})
    with open(site_log, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
                                   cwd=ROOT, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT)
        code = process.wait(timeout=30)
    assert code != 0
    assert "needs a fixed port" in site_log.read_text()
