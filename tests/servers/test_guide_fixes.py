"""Each guide's Fix, taken from its Markdown, closes a real open server probed from an address it does not trust.

The framework is tests/servers/guide_fix.py (PRODUCTS is its table); the README's Development section says how to
add a product. These tests need root and iproute2 (the namespace) and the product's package: they fail under
CI=true and skip elsewhere when one is missing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import pytest
from support import skip_or_fail

from servers import exim, guide_fix, opensmtpd, sendmail
from servers.guide_fix import GUIDES, PRODUCTS, GuideSteps, mutated_guide, prove_fix
from servers.mta import MtaUnavailable
from servers.netns import Netns, NetnsUnavailable
from servers.netns import available as netns_available

# Rewrites of each guide's Fix that leave the server open to strangers: (product, text of the Fix block, what it
# becomes, what the re-test then says). The proof must fail for every one of them.
STILL_OPEN = [
    # The rewrite of issue 13. Postfix 3.7 will not run such a list: every smtpd exits at start ("specify at least
    # one working instance of: reject_unauth_destination, ..."), so the re-test times out rather than finding it
    # open. Not closed all the same: the proof fails.
    ("Postfix", "permit_sasl_authenticated, reject_unauth_destination", "permit_sasl_authenticated, permit",
     "inconclusive"),
    # the same intent in a list Postfix runs: a lookup that answers OK before the refusal (Postfix ignores, and
    # then also refuses, a bare `permit, reject_unauth_destination`)
    ("Postfix", "permit_sasl_authenticated, reject_unauth_destination",
     "permit_sasl_authenticated, check_client_access static:OK, reject_unauth_destination", "open"),
    ("Postfix", "mynetworks = 127.0.0.0/8", "mynetworks = 0.0.0.0/0 127.0.0.0/8", "open"),
    ("Squid", "http_access allow localnet", "http_access allow all", "open"),
    ("tinyproxy", "Allow 192.168.1.0/24", "Allow 0.0.0.0/0", "open"),
    ("Dante", "from: 192.168.1.0/24", "from: 0.0.0.0/0", "open"),
    # the forward proxy left on: `<Proxy "*"> Require all granted` stays in force
    ("Apache", "ProxyRequests Off", "ProxyRequests On", "open"),
    ("nginx", "proxy_pass http://192.168.1.20:8081;", "proxy_pass $scheme://$http_host$request_uri;", "open"),
    ("Privoxy", "permit-access 192.168.1.0/24", "permit-access 0.0.0.0/0", "open"),
    ("Exim", "192.168.1.0/24", "0.0.0.0/0", "open"),
    ("Exim", "domainlist relay_to_domains =", "domainlist relay_to_domains = *", "open"),
    ("Sendmail", "FEATURE(`access_db')", "FEATURE(`promiscuous_relay')", "open"),
    ("OpenSMTPD", "match from src 192.168.1.0/24", "match from src 0.0.0.0/0", "open"),
]


MTA_AVAILABLE = {"Exim": exim.exim_available, "Sendmail": sendmail.sendmail_available,
                 "OpenSMTPD": opensmtpd.opensmtpd_available}


def require(product: str) -> None:
    """The namespace and the product's real server, or skip (fail under CI)."""
    from conftest import require_postfix, require_proxy

    try:
        netns_available()
    except NetnsUnavailable as exc:
        skip_or_fail(str(exc))
    if product == "Postfix":
        require_postfix()
    elif product in MTA_AVAILABLE:
        try:
            MTA_AVAILABLE[product]()
        except MtaUnavailable as exc:
            skip_or_fail(str(exc))
    else:
        require_proxy({"Squid": "squid", "tinyproxy": "tinyproxy", "Dante": "danted", "Apache": "apache2",
                       "nginx": "nginx", "Privoxy": "privoxy"}[product])


@pytest.mark.parametrize("name", sorted(PRODUCTS))
async def test_guide_fix_closes_the_open_server(tmp_path, name):
    require(name)
    proof = await prove_fix(PRODUCTS[name], tmp_path)
    assert proof.problems() == []
    assert proof.place is not None and proof.place.host.startswith("198.1")
    # the probes came from our side of the veth pair, which the guide's trusted networks do not cover
    assert all(c["host"] == proof.place.host for c in proof.after["checks"])
    assert proof.revealed


@pytest.mark.parametrize("name,old,new,after", STILL_OPEN, ids=[f"{m[0]}:{m[2]}" for m in STILL_OPEN])
async def test_a_fix_rewritten_to_leave_the_server_open_fails_the_proof(tmp_path, name, old, new, after):
    require(name)
    guide = mutated_guide(GUIDES / PRODUCTS[name].guide, tmp_path / "guides" / PRODUCTS[name].guide, old, new)
    assert new in GuideSteps.read(guide).fix_block().content
    proof = await prove_fix(PRODUCTS[name], tmp_path / "run", guide=guide)
    assert proof.summary(proof.before) == "open" and proof.revealed
    assert proof.summary(proof.after) == after, proof.after and proof.after["summary"]
    assert bool(proof.open_rows(proof.after)) is (after == "open")
    assert any(f"re-test says {after}" in problem for problem in proof.problems())


def test_every_product_of_the_table_has_a_mutation_and_a_guide_with_check_fix_and_reload():
    assert {m[0] for m in STILL_OPEN} == set(PRODUCTS)
    for product in PRODUCTS.values():
        steps = GuideSteps.read(GUIDES / product.guide)
        assert steps.commands("Check") and steps.commands("Reload"), product.guide
        assert steps.fix_block().validate not in (None, "none")
        assert product.cause in steps.text["Check"], product.guide


async def test_the_namespace_and_what_ran_in_it_are_gone_when_the_proof_fails(tmp_path):
    """A fixture that dies half-way leaves nothing: its processes in the namespace are killed, the namespace and
    the veth pair deleted."""
    try:
        netns_available()
    except NetnsUnavailable as exc:
        skip_or_fail(str(exc))
    started = []

    def start(_base, place, _sink_port):
        started.append((place, subprocess.Popen(place.wrap(["/bin/sleep", "600"]))))
        raise RuntimeError("the fixture did not come up")

    with pytest.raises(RuntimeError, match="did not come up"):
        await prove_fix(dataclasses.replace(PRODUCTS["tinyproxy"], start=start), tmp_path)
    place, process = started[0]
    assert process.wait(timeout=10) == -9  # killed with the namespace it ran in
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    addresses = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
    assert place.netns not in namespaces.split() and f" {place.peer}/" not in addresses


def test_a_namespace_left_by_a_killed_test_run_is_swept_at_the_next_one():
    """A test process killed with SIGKILL runs no atexit hook: the next namespace made sweeps its namespaces (and
    what still runs in them), and never one of a live process."""
    try:
        netns_available()
    except NetnsUnavailable as exc:
        skip_or_fail(str(exc))
    dead = subprocess.Popen(["/bin/true"])
    dead.wait(timeout=10)  # a pid that no process has now
    stale, live = f"sysgf{dead.pid}-0", f"sysgf{os.getpid()}-999"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "/bin/sleep", "600"])
    try:
        time.sleep(0.2)
        with Netns.create():
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
        assert stale not in names and live in names
        assert leftover.wait(timeout=10) == -9
    finally:
        leftover.kill()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_the_owner_starts_the_audit_from_inside_the_namespace_over_http(tmp_path):
    """The expert's way, from the server itself: the site serves on our side of the veth pair, the request comes
    from inside the namespace, and the site tests that address (`self`), from ours."""
    import json
    import sys

    from support import ServedSite, wait_done_sync

    from servers.netns import Netns
    from servers.proxies import start_tinyproxy

    require("tinyproxy")
    with Netns.create() as netns:
        place = netns.place
        tinyproxy = start_tinyproxy(tmp_path, "open", place=place)
        try:
            env = {"SECURE_ALLOW_NETWORKS": "198.18.0.0/15", "SECURE_RELAY_PORTS": "",
                   "SECURE_PROXY_PORTS": str(tinyproxy.port), "SECURE_CANARY_SMTP_LISTEN": f"{place.peer}:0",
                   "SECURE_CANARY_TLS_LISTEN": f"{place.peer}:0", "SECURE_CANARY_ADDRESS": place.peer,
                   "SECURE_PROXY_STEP_TIMEOUT": "3"}
            with ServedSite(tmp_path, env, port=free_port_on(place.peer), host=place.peer) as site:
                ask = ("import sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
                       "sys.argv[1], data=b'', method='POST'), timeout=10); print(r.status, r.read().decode())")
                done = subprocess.run(place.wrap([sys.executable, "-c", ask, site.url + "/api/v1/audits/self"]),
                                      capture_output=True, text=True, timeout=30)
                status, _, body = done.stdout.partition(" ")
                assert status == "202", done.stdout + done.stderr
                data = wait_done_sync(site.url, json.loads(body)["id"], seconds=60)
        finally:
            tinyproxy.stop()
    assert data["hosts"] == [place.host] and data["summary"]["proxy"] == "open"
    assert {c["host"] for c in data["checks"]} == {place.host}


def free_port_on(host: str) -> int:
    import socket
    from contextlib import closing

    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- the appliers and readers, without any server ----------------------------------------------------------------

def test_replace_lines_puts_the_block_where_the_first_replaced_line_was(tmp_path):
    config = tmp_path / "squid.conf"
    config.write_text("http_port 1\nacl localnet src 10.0.0.0/8\nacl x src 1.2.3.4\nhttp_access allow all\n"
                      "cache deny all\nhttp_access deny all\n")
    guide_fix.replace_lines(r"^\s*(http_access|acl\s+localnet)\s")(config, "acl localnet src 192.168.1.0/24\n"
                                                                           "http_access allow localnet\n"
                                                                           "http_access deny all\n")
    assert config.read_text() == ("http_port 1\nacl localnet src 192.168.1.0/24\nhttp_access allow localnet\n"
                                  "http_access deny all\nacl x src 1.2.3.4\ncache deny all\n")


def test_replace_rules_replaces_whole_rule_blocks(tmp_path):
    config = tmp_path / "danted.conf"
    config.write_text("internal: 1.2.3.4 port = 1\nclient pass {\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n"
                      "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n# end\n")
    guide_fix.replace_rules(r"^\s*(client|socks)\s+(pass|block)\b")(config, "client pass {\n  from: 10.0.0.0/8\n}\n")
    assert config.read_text() == "internal: 1.2.3.4 port = 1\nclient pass {\n  from: 10.0.0.0/8\n}\n# end\n"


def test_commands_and_the_fix_block_come_from_the_guide():
    steps = GuideSteps.read(GUIDES / "relay/postfix.md")
    assert "postconf mynetworks mynetworks_style" in steps.commands("Check")
    assert steps.commands("Reload") == ["postfix reload"]
    assert steps.fix_block().content.startswith("mynetworks = ")


def test_a_mutated_guide_changes_the_fix_block_only(tmp_path):
    source = GUIDES / "proxy/squid.md"
    copy = mutated_guide(source, tmp_path / "squid.md", "http_access allow localnet", "http_access allow all")
    before, after = GuideSteps.read(source), GuideSteps.read(copy)
    assert "http_access allow all" in after.fix_block().content
    assert after.text["Check"] == before.text["Check"] and after.commands("Reload") == before.commands("Reload")
    with pytest.raises(AssertionError, match="update the mutation"):
        mutated_guide(source, tmp_path / "x.md", "no such text", "y")


@pytest.mark.parametrize("output,found", [
    ("$ grep\n3:Port 8888\n4:Listen 1.2.3.4\n", True),
    ("$ grep\n3:Port 8888\n5:Allow 127.0.0.1\n", False),
])
def test_tinyproxy_check_reveals_a_missing_allow(output, found):
    assert (guide_fix.tinyproxy_reveals(output) is not None) is found


def test_dante_check_reveals_an_open_pass_rule_but_not_an_open_block_rule():
    closed = ("3:socksmethod: none\n5:client pass {\n6:    from: 192.168.1.0/24 to: 0.0.0.0/0\n"
              "9:client block {\n10:    from: 0.0.0.0/0 to: 0.0.0.0/0\n")
    assert guide_fix.dante_reveals(closed) is None
    assert guide_fix.dante_reveals(closed.replace("192.168.1.0/24", "0.0.0.0/0")) == (
        "client pass: 6:    from: 0.0.0.0/0 to: 0.0.0.0/0")
