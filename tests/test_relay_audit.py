"""The relay checks through the whole lifecycle: sink confirmation during and after the audit."""

import asyncio
import sqlite3

import aiosmtplib
import pytest
from fakes import smtp as fakes

from app.audits import Auditor
from app.store import SCHEMA_VERSION, Store

PROBE_DOMAIN = "sink.test.example"


async def audit_relay(settings, store, sink, port):
    settings.relay_ports = [port]
    settings.probe_domain = PROBE_DOMAIN
    auditor = Auditor(settings, store, sink=sink)
    sink.on_delivery = auditor.delivered
    audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["relay"])
    await asyncio.wait_for(asyncio.shield(auditor._tasks[audit.id]), 30)
    return auditor, await store.get_audit(audit.id)


async def test_open_relay_audit_is_open_and_confirmed(settings, store, sink):
    policy = fakes.OpenRelay()
    policy.sink = ("127.0.0.1", sink.port, PROBE_DOMAIN)
    async with fakes.FakeSmtpServer(policy) as server:
        _, audit = await audit_relay(settings, store, sink, server.port)
    assert audit.summary == {"relay": "open", "proxy": None, "blocklist": None}
    assert len(audit.checks) == 22
    assert {(c.result.reason, c.result.confirmed) for c in audit.checks} == {("delivered", True)}
    assert "our sink received the tagged message" in audit.checks[0].result.transcript[-1].text


async def test_a_late_arrival_still_confirms_the_stored_check(settings, store, sink):
    settings.sink_wait = 0.2
    async with fakes.FakeSmtpServer(fakes.AcceptAndDiscard()) as server:
        _, audit = await audit_relay(settings, store, sink, server.port)
    assert audit.status == "done" and audit.summary["relay"] == "open"
    assert {c.result.reason for c in audit.checks} == {"accepted_unconfirmed", "accepted_as_local"}
    late = next(c for c in audit.checks if c.result.name == "relay.v2")
    await aiosmtplib.send(b"Subject: late\r\n\r\nlate\r\n", sender="x@relay.example",
                          recipients=[f"{late.result.tag}@{PROBE_DOMAIN}"], hostname="127.0.0.1", port=sink.port,
                          timeout=5)
    again = await store.get_audit(audit.id)
    by_name = {c.result.name: c.result for c in again.checks}
    assert (by_name["relay.v2"].reason, by_name["relay.v2"].confirmed) == ("delivered", True)
    assert by_name["relay.v3"].reason == "accepted_unconfirmed"


class DeliversToAnotherDomain(fakes.OpenRelay):
    """An open relay that delivers each tagged message to our sink's address, but for the tag at another domain
    (a look-alike of the probe domain among them): the tag alone must never confirm anything."""

    DOMAINS = ("elsewhere.example", f"{PROBE_DOMAIN}.evil.example", f"evil-{PROBE_DOMAIN}", f"x.{PROBE_DOMAIN}")

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def relay(self, conn, body):
        host, port, _domain = self.sink
        for rcpt in conn.rcpts:
            match = fakes.TAG.search(rcpt)
            if not match:
                continue
            for domain in self.DOMAINS:
                try:
                    await aiosmtplib.send(body, sender="relay@fake.test.example",
                                          recipients=[f"{match.group(0)}@{domain}"], hostname=host, port=port,
                                          timeout=5)
                except aiosmtplib.SMTPRecipientsRefused:
                    self.refused += 1


async def test_a_tagged_message_for_another_domain_never_confirms_a_check(settings, store, sink):
    """The sink counts only messages for the probe domain: our tags at any other domain are refused at RCPT, so
    every check stays accepted-but-unconfirmed."""
    settings.sink_wait = 0.3
    policy = DeliversToAnotherDomain()
    policy.sink = ("127.0.0.1", sink.port, PROBE_DOMAIN)
    async with fakes.FakeSmtpServer(policy) as server:
        _, audit = await audit_relay(settings, store, sink, server.port)
    assert len(audit.checks) == 22
    assert {(c.result.reason, c.result.confirmed) for c in audit.checks} == {("accepted_unconfirmed", False),
                                                                            ("accepted_as_local", False)}
    assert policy.refused == 22 * len(DeliversToAnotherDomain.DOMAINS)  # every delivery was tried, and refused
    assert not sink.arrivals


async def test_the_sink_refuses_everything_but_probe_tags(sink):
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await aiosmtplib.send(b"Subject: x\r\n\r\nx\r\n", sender="a@b.example", recipients=["victim@example.com"],
                              hostname="127.0.0.1", port=sink.port, timeout=5)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await aiosmtplib.send(b"Subject: x\r\n\r\nx\r\n", sender="a@b.example",
                              recipients=[f"notatag@{PROBE_DOMAIN}"], hostname="127.0.0.1", port=sink.port, timeout=5)
    assert not sink.arrivals


async def test_store_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE audits (id TEXT PRIMARY KEY, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
            status TEXT NOT NULL, target TEXT NOT NULL, requester TEXT NOT NULL, verification_id TEXT,
            hosts TEXT NOT NULL, services TEXT NOT NULL, planned INTEGER NOT NULL DEFAULT 0, previous_id TEXT,
            engine_version TEXT NOT NULL, summary TEXT, error TEXT);
        CREATE TABLE checks (audit_id TEXT NOT NULL, seq INTEGER NOT NULL, finished_at REAL NOT NULL,
            service TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, name TEXT NOT NULL,
            verdict TEXT NOT NULL, reason TEXT NOT NULL, confirmed INTEGER NOT NULL, fingerprint TEXT,
            transcript TEXT NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (audit_id, seq));
        INSERT INTO audits VALUES ('AAAAAAAAAAAAAAAAAAAAAA', 1, 1, 2, 'done', 'self', '192.0.2.1', NULL,
            '["192.0.2.1"]', '["relay"]', 1, NULL, '2026.11.1', '{"relay": "unreachable", "proxy": null}', NULL);
        INSERT INTO checks VALUES ('AAAAAAAAAAAAAAAAAAAAAA', 1, 2, 'relay', '192.0.2.1', 25, 'relay.reachable',
            'unreachable', 'refused', 0, NULL, '[]', 'connection refused');
    """)
    conn.commit()
    conn.close()
    store = Store(str(path))
    await store.open()
    assert await store.schema_version() == SCHEMA_VERSION == 10
    audit = await store.get_audit("AAAAAAAAAAAAAAAAAAAAAA")
    assert audit.checks[0].result.reason == "refused" and audit.checks[0].result.tag is None
    # version 4: the old audit counts for its requester and for its address's budget
    assert audit.requester_key == "192.0.2.1"
    assert await store.addresses_of(audit.id) == ["192.0.2.1"]
    await store.close()


async def test_a_live_follower_sees_every_row_confirmed_before_done(settings, store, sink):
    """Issue 11: the upgrade of a row to `confirmed` was stored but never streamed to a live follower."""
    settings.relay_ports = []
    settings.probe_domain = PROBE_DOMAIN
    policy = fakes.OpenRelay()
    policy.sink = ("127.0.0.1", sink.port, PROBE_DOMAIN)
    async with fakes.FakeSmtpServer(policy) as server:
        settings.relay_ports = [server.port]
        auditor = Auditor(settings, store, sink=sink)
        sink.on_delivery = auditor.delivered
        audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"], services=["relay"])
        seen: list = []
        async with asyncio.timeout(30):
            async for event in auditor.follow(audit.id, keepalive=5):
                if event is None:
                    continue
                seen.append(event)
                if event.kind == "done":
                    break
    assert seen[-1].kind == "done" and seen[-1].data["summary"] == {"relay": "open", "proxy": None, "blocklist": None}
    checks = [e for e in seen if e.kind == "check"]
    final = {e.seq: e.data for e in checks}  # the last state sent for each row
    assert len(final) == 22
    assert {(r.reason, r.confirmed) for r in final.values()} == {("delivered", True)}
    # followed live, not replayed: each row was first sent as accepted, then again once our sink had its message
    states = {}
    for event in checks:
        states.setdefault(event.seq, []).append((event.data.reason, event.data.confirmed))
    assert {tuple(s) for s in states.values()} == {(("accepted_unconfirmed", False), ("delivered", True)),
                                                   (("accepted_as_local", False), ("delivered", True))}


async def test_a_percent_hack_relay_is_open_once_our_sink_receives_its_messages(settings, store, sink):
    """Accepted for an address at the server itself is local delivery, until our sink receives the message: then
    the row is open/delivered like any relayed probe, and so is the summary."""
    settings.local_form_wait = 5.0
    policy = fakes.PercentHackRelay()
    policy.sink = ("127.0.0.1", sink.port, PROBE_DOMAIN)
    async with fakes.FakeSmtpServer(policy) as server:
        _, audit = await audit_relay(settings, store, sink, server.port)
    by_name = {c.result.name: c.result for c in audit.checks}
    assert {n for n, r in by_name.items() if r.verdict == "open"} == {"relay.v11", "relay.v12", "relay.v13"}
    assert all((by_name[n].reason, by_name[n].confirmed) == ("delivered", True)
               for n in ("relay.v11", "relay.v12", "relay.v13"))
    assert audit.summary["relay"] == "open"


async def test_a_server_that_keeps_mail_for_itself_is_closed_without_the_whole_sink_wait(settings, store, sink):
    """Issue 13 (OpenSMTPD): forms addressed to the server itself were `open` although nothing reached our sink,
    and the audit then waited the whole SECURE_SINK_WAIT for them."""
    settings.sink_wait = 30.0
    settings.local_form_wait = 0.5
    async with fakes.FakeSmtpServer(KeepsLocalForms()) as server:
        started = asyncio.get_running_loop().time()
        _, audit = await audit_relay(settings, store, sink, server.port)
        elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < 10, elapsed
    local = {c.result.name for c in audit.checks if c.result.reason == "accepted_as_local"}
    assert local == {"relay.v11", "relay.v19", "relay.v22"}
    assert {c.result.verdict for c in audit.checks} == {"closed"}
    assert audit.summary["relay"] == "closed"


async def test_a_late_arrival_of_a_local_form_makes_the_row_and_the_summary_open(settings, store, sink):
    """A message accepted for the server itself that reaches our sink after SECURE_LOCAL_FORM_WAIT: the server did
    relay it after all. The stored row becomes open/delivered and the finished audit's summary open."""
    settings.local_form_wait = 0.2
    async with fakes.FakeSmtpServer(KeepsLocalForms()) as server:
        _, audit = await audit_relay(settings, store, sink, server.port)
    assert audit.summary["relay"] == "closed"
    late = next(c for c in audit.checks if c.result.name == "relay.v19")
    await aiosmtplib.send(b"Subject: late\r\n\r\nlate\r\n", sender="x@relay.example",
                          recipients=[f"{late.result.tag}@{PROBE_DOMAIN}"], hostname="127.0.0.1", port=sink.port,
                          timeout=5)
    again = await store.get_audit(audit.id)
    by_name = {c.result.name: c.result for c in again.checks}
    assert (by_name["relay.v19"].verdict, by_name["relay.v19"].reason) == ("open", "delivered")
    assert by_name["relay.v11"].reason == "accepted_as_local"
    assert again.summary["relay"] == "open"


class KeepsLocalForms(fakes.Policy):
    """Accepts three recipient forms without a foreign domain for local delivery (as OpenSMTPD does), relays nothing."""

    def rcpt(self, conn, arg):
        if arg.startswith(('<"', "<sink.test.example!")) and "%" in arg or arg.endswith("@>") or (
                arg.startswith("<sink.test.example!") and "@" not in arg):
            return b"250 2.1.5 Destination address valid: Recipient ok\r\n"
        return super().rcpt(conn, arg)
