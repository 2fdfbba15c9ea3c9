"""compose.yaml, the reference deployment of several instances, checked without Docker (the engine cannot run here).

What can be checked is checked against the real parts: each service's command is a real `secure-your-server`
command, the settings each process gets are valid Settings, the listeners bind each port once and publish it on
the same port, the image installs the extras these processes import, and deploy/nginx's template runs in a real
nginx in front of two real `serve` processes, passing each visitor's address and the live event stream through.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support import ROOT, ServedSite, free_port, require_binary

from app.config import Settings, parse_listen

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict] = COMPOSE["services"]
TEMPLATE = ROOT / "deploy" / "nginx" / "default.conf.template"
EXAMPLE_ENV = ROOT / "deploy" / "secure.env.example"
# what an operator puts in .env (compose.yaml's ${NAME:?...} variables)
DOT_ENV = {"POSTGRES_PASSWORD": "pw", "SITE_ADDRESS": "203.0.113.10", "CANARY_ADDRESS": "203.0.113.11"}


def site_services() -> dict[str, dict]:
    """The services that run our image."""
    return {name: service for name, service in SERVICES.items() if service.get("image", "").startswith(
        "secure-your-server")}


def interpolate(value: str) -> str:
    """compose's ${NAME:?message} with the operator's .env values."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: DOT_ENV[m.group(1)], value)


def example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {name: value for name, value in pairs}


def process_env(service: dict) -> dict[str, str]:
    """What the process sees: secure.env (the example), then compose's `environment` (which wins)."""
    assert service["env_file"] == ["secure.env"]
    return {**example_env(), **{k: interpolate(str(v)) for k, v in service["environment"].items()}}


def settings_of(env: dict[str, str]) -> Settings:
    unknown = [name for name in env if name.startswith("SECURE_")
               and name[len("SECURE_"):].lower() not in Settings.model_fields]
    assert not unknown, f"not settings of the site (misspelt?): {unknown}"
    saved = {k: v for k, v in os.environ.items() if k.startswith("SECURE_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update(env)
        return Settings()
    finally:
        for name in env:
            os.environ.pop(name, None)
        os.environ.update(saved)


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    found = []
    for spec in service.get("ports", []):
        host, host_port, container_port = interpolate(spec).rsplit(":", 2)
        found.append((host, int(host_port), int(container_port)))
    return found


def test_every_site_service_runs_a_real_command() -> None:
    services = site_services()
    assert {"web-1", "web-2", "worker-1", "worker-2", "listeners-sink", "listeners-canaries"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "secure-your-server", name
        answer = subprocess.run([sys.executable, "-m", "app.cli", *command[1:], "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, f"{name}: {' '.join(command)}: {answer.stderr[-500:]}"


def test_every_process_gets_valid_shared_settings() -> None:
    shared = None
    for name, service in site_services().items():
        settings = settings_of(process_env(service))
        assert settings.database_url.startswith("postgresql://"), name
        assert settings.limits_storage.startswith("redis://"), name
        assert settings.secret_key, f"{name}: every process needs the same secret (canary tokens)"
        facts = (settings.database_url.rsplit("@", 1)[1], settings.limits_storage.rsplit("@", 1)[-1],
                 settings.secret_key)
        shared = shared or facts
        assert facts == shared, f"{name} is not on the same database, Redis and secret as the others"
        if name.startswith(("web", "worker")):
            assert settings.listeners == "external", f"{name} must not bind the sink and canaries itself"


def test_each_listener_binds_once_and_is_published_on_its_own_port() -> None:
    bound: dict[int, list[str]] = {}
    for name, service in site_services().items():
        settings = settings_of(process_env(service))
        listens = [v for v in (settings.sink_listen, settings.canary_smtp_listen, settings.canary_http_listen,
                               settings.canary_tls_listen) if v]
        if not name.startswith("listeners"):
            continue
        ports = published(service)
        for listen in listens:
            port = parse_listen(listen)[1]
            bound.setdefault(port, []).append(name)
            # the audits name the canaries' ports: the public port must be the one the process listens on
            assert any(host_port == port == inner for _h, host_port, inner in ports), f"{name}: {listen}"
        assert sorted(p for _h, p, _i in ports) == sorted(parse_listen(v)[1] for v in listens), name
    web = settings_of(process_env(SERVICES["web-1"]))
    assert sorted(bound) == sorted({parse_listen(v)[1] for v in (web.sink_listen, web.canary_smtp_listen,
                                                                 web.canary_http_listen, web.canary_tls_listen)})
    assert all(len(names) == 1 or names == ["listeners-sink", "listeners-canaries"] for names in bound.values())
    sink_host = {h for h, _p, _i in published(SERVICES["listeners-sink"])}
    canary_hosts = {h for h, _p, _i in published(SERVICES["listeners-canaries"])}
    assert sink_host == {DOT_ENV["SITE_ADDRESS"]} and canary_hosts == {DOT_ENV["CANARY_ADDRESS"]}
    assert web.canary_address == DOT_ENV["CANARY_ADDRESS"]
    assert {DOT_ENV["SITE_ADDRESS"], DOT_ENV["CANARY_ADDRESS"]} <= set(web.public_addresses)


def test_only_the_proxy_reaches_the_web_processes() -> None:
    gateway = COMPOSE["networks"]["site"]["ipam"]["config"][0]["gateway"]
    upstreams = re.findall(r"server 127\.0\.0\.1:(\d+)", TEMPLATE.read_text())
    web_ports = []
    for name in ("web-1", "web-2"):
        settings = settings_of(process_env(SERVICES[name]))
        assert [str(n) for n in settings.trusted_proxies] == [f"{gateway}/32"], name
        [(host, host_port, _inner)] = published(SERVICES[name])
        assert host == "127.0.0.1", f"{name} is published beyond loopback: anyone could claim any address"
        web_ports.append(str(host_port))
    assert upstreams == web_ports
    for name in ("postgres", "redis", "worker-1", "worker-2"):
        assert not SERVICES[name].get("ports"), f"{name} needs no published port"
    assert SERVICES["proxy"]["network_mode"] == "host"


def test_the_image_installs_what_the_processes_import() -> None:
    """The Dockerfile's own requirement list (its RUN line, executed) has the PostgreSQL and Redis clients."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = re.search(r'^ARG EXTRAS="([^"]*)"', dockerfile, re.MULTILINE)
    snippet = re.search(r'RUN python -c "(.*?requirements\.txt.*?)" \\', dockerfile)
    assert extras and snippet
    out = Path("/tmp") / f"requirements-{os.getpid()}.txt"
    code = snippet.group(1).replace("/tmp/requirements.txt", str(out))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "EXTRAS": extras.group(1)},
                   check=True, timeout=60)
    names = {re.split(r"[<>=\[ ;]", line, maxsplit=1)[0].lower() for line in out.read_text().split()}
    out.unlink()
    assert {"psycopg", "redis", "procrastinate", "fastapi"} <= names


@pytest.fixture
def self_signed(tmp_path: Path) -> Path:
    openssl = require_binary("openssl", "openssl")
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=site",
                    "-keyout", str(tls / "site.key"), "-out", str(tls / "site.crt")],
                   check=True, capture_output=True, timeout=60)
    return tls


def test_the_proxy_template_passes_each_visitor_and_the_live_stream(tmp_path: Path, self_signed: Path) -> None:
    """deploy/nginx's template in a real nginx (as the image renders it: SITE_ADDRESS put in, inside an http
    block), in front of two real `serve` processes on its upstream ports: each answers, each sees the visitor's own
    address (not the proxy's, not a header the visitor forged), and the event stream comes through unbuffered."""
    nginx = require_binary("/usr/sbin/nginx", "nginx-light")
    site_address, visitor = "127.0.0.61", "127.0.0.62"
    https_port, http_port = free_port(), free_port()
    upstream_ports = [free_port(), free_port()]
    text = TEMPLATE.read_text().replace("${SITE_ADDRESS}", site_address)
    text = text.replace(f"{site_address}:80;", f"{site_address}:{http_port};")
    text = text.replace(f"{site_address}:443 ssl;", f"{site_address}:{https_port} ssl;")
    text = text.replace("/etc/nginx/tls", str(self_signed))
    for fixed, port in zip(("8001", "8002"), upstream_ports, strict=True):
        text = text.replace(f"127.0.0.1:{fixed} ", f"127.0.0.1:{port} ")
    assert "${" not in text
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                    f"events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n"
                    f" client_body_temp_path {tmp_path}/body;\n proxy_temp_path {tmp_path}/proxy;\n{text}\n}}\n")
    checked = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    env = {"SECURE_TRUSTED_PROXIES": "127.0.0.1", "SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": "",
           "SECURE_PROXY_PORTS": "", "SECURE_PUBLIC_URL": f"https://{site_address}:{https_port}",
           "SECURE_DATABASE_URL": f"sqlite:///{tmp_path / 'site.db'}"}  # one database: one site
    sites = []
    for n, port in enumerate(upstream_ports):
        (tmp_path / f"web{n}").mkdir()
        sites.append(ServedSite(tmp_path / f"web{n}", env, port=port))
    proxy = subprocess.Popen([nginx, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"https://{site_address}:{https_port}"
        transport = httpx.HTTPTransport(local_address=visitor, verify=False)
        with httpx.Client(base_url=base, transport=transport, timeout=10) as client:
            _wait(client)
            seen = {client.get("/api/v1/whoami", headers={"X-Forwarded-For": "203.0.113.99"}).json()["address"]
                    for _ in range(8)}
            assert seen == {visitor}
            instances = {client.get("/healthz").json()["instance"] for _ in range(8)}
            assert len(instances) == 2, "nginx must spread requests over both web processes"
            started = client.post("/api/v1/audits/self", json={"checks": ["relay"]})
            assert started.status_code == 202, started.text
            with client.stream("GET", f"/api/v1/audits/{started.json()['id']}/events") as stream:
                events = [line for line in _lines(stream, 20) if line.startswith("event:")]
            assert events[-1] == "event: done"
        redirect = httpx.get(f"http://{site_address}:{http_port}/start", follow_redirects=False, timeout=5)
        assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)
        for site in sites:
            site.stop()


def _wait(client: httpx.Client, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("nginx did not answer")


def _lines(stream: httpx.Response, seconds: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    for line in stream.iter_lines():  # the stream ends after `done`
        lines.append(line)
        if line == "event: done" or time.monotonic() > deadline or len(lines) > 1000:
            break
    return lines
