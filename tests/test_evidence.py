"""Bounded evidence (issue 10, part 9): a relay session's opening dialogue is stored once and referenced by its
rows."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from fakes import smtp as fakes
from support import relay_port

from app.audits import Auditor
from app.probes.smtp import VARIANTS_PER_SESSION
from app.store import Store
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict



def stored_bytes(db: str) -> tuple[int, int]:
    """Transcript bytes in SQLite: the rows' own lines, and the shared openings."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT COALESCE(SUM(LENGTH(transcript)), 0) FROM checks").fetchone()[0]
        openings = conn.execute("SELECT COALESCE(SUM(LENGTH(lines)), 0) FROM openings").fetchone()[0]
        return rows, openings
    finally:
        conn.close()


def greeting_texts(policy: fakes.HugeGreeting) -> tuple[str, str]:
    """The first and the last greeting line as the evidence shows them."""
    return ("220-" + policy.greeting_lines[0].decode("latin-1"), "220-" + policy.greeting_lines[-1].decode("latin-1"))


# --- the probes: one opening per session, shared by its rows ---------------------------------------------------
async def test_the_rows_of_a_session_share_its_opening():
    policy = fakes.HugeGreeting()
    first, last = greeting_texts(policy)
    async with fakes.FakeSmtpServer(policy) as server:
        results = await relay_port(server.port)
    openings = {id(r.opening): r.opening for r in results.values()}
    assert None not in openings.values()
    # 22 variants in sessions of 8: three connections, three openings, each shared by the rows of its session
    assert len(openings) == policy.connections == -(-len(results) // VARIANTS_PER_SESSION)
    for opening in openings.values():
        texts = [line.text for line in opening.lines]
        assert first in texts and last in texts and any(t.startswith("EHLO ") for t in texts)
        assert not any(t.startswith(("variant ", "MAIL FROM")) for t in texts)  # no variant's own line
    for result in results.values():
        shown = len(result.opening.lines)
        assert all(a is b for a, b in zip(result.transcript, result.opening.lines))  # the same objects, not copies
        assert result.transcript[shown].text.startswith(f"variant {result.name.split('.')[1]}:")
        assert (result.verdict, result.reason) == (Verdict.CLOSED, "relay_denied")


async def test_every_line_of_a_greeting_stays_within_the_readers_bounds():
    policy = fakes.HugeGreeting(binary=True)
    async with fakes.FakeSmtpServer(policy) as server:
        results = await relay_port(server.port)
    opening = next(iter(results.values())).opening
    greeting = [line for line in opening.lines if line.dir == "in" and line.text.startswith("220")]
    assert len(greeting) == len(policy.greeting_lines) + 1 <= 64
    # a line is at most 2 KiB from the wire; escaped, each byte at most 4 characters
    assert max(len(line.text) for line in greeting) <= 4 * 2048
    assert "\\x80\\x81" in greeting[0].text


# --- the store: an opening once per session; old rows still readable -------------------------------------------
async def test_the_store_keeps_an_opening_once_and_rebuilds_every_row(settings, tmp_path):
    policy = fakes.HugeGreeting()
    first, last = greeting_texts(policy)
    db = str(tmp_path / "audit.db")
    store = Store(db)
    await store.open()
    try:
        async with fakes.FakeSmtpServer(policy) as server:
            settings.relay_ports = [server.port]
            auditor = Auditor(settings, store)
            audit = await auditor.start(target="self", requester="127.0.0.1", hosts=["127.0.0.1"],
                                        services=["relay"])
            await asyncio.wait_for(asyncio.shield(auditor._tasks[audit.id]), 30)
        conn = sqlite3.connect(db)
        openings = conn.execute("SELECT key, lines FROM openings WHERE audit_id=?", (audit.id,)).fetchall()
        rows = conn.execute("SELECT opening, transcript FROM checks WHERE audit_id=?", (audit.id,)).fetchall()
        conn.close()
        # one stored opening per session, holding the greeting once; no row repeats it
        assert len(openings) == policy.connections == 3
        assert all(lines.count(first) == 1 and lines.count(last) == 1 for _, lines in openings)
        assert len(rows) == 22 and all(first not in transcript for _, transcript in rows)
        assert {key for key, _ in rows} == {key for key, _ in openings}
        # each session's opening is about 16 KiB; 22 copies of it would be over 350 KiB
        row_bytes, opening_bytes = stored_bytes(db)
        assert opening_bytes < 3 * 20 * 1024 and row_bytes < 22 * 1024

        loaded = await store.get_audit(audit.id)
        assert len(loaded.checks) == 22
        for stored in loaded.checks:
            texts = [line.text for line in stored.result.transcript]
            assert texts[0].startswith("connecting to 127.0.0.1") and first in texts and last in texts
            assert texts[-1].startswith("verdict: closed (relay_denied)")
        # rows of one session share one loaded opening: read once, not once per row
        assert len({id(s.result.opening) for s in loaded.checks}) == 3
        public = loaded.checks[0].result.to_dict()
        assert set(public) == {"service", "host", "port", "name", "verdict", "reason", "confirmed", "fingerprint",
                               "transcript", "detail", "tag"}  # as the README's API says: no `opening`
        assert [line["text"] for line in public["transcript"]] == texts_of(loaded.checks[0].result)
        assert all(set(line) == {"t", "dir", "text"} for line in public["transcript"])
    finally:
        await store.close()


def texts_of(result: CheckResult) -> list[str]:
    return [line.text for line in result.transcript]


async def test_a_version_3_database_keeps_its_full_transcripts(tmp_path):
    path = tmp_path / "v3.db"
    full = [{"t": 0.0, "dir": "info", "text": "connecting to 192.0.2.1 port 25"},
            {"t": 0.1, "dir": "in", "text": "220 old.example ESMTP"},
            {"t": 0.2, "dir": "out", "text": "MAIL FROM:<sys-probe@sink.test.example>"}]
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '3');
        CREATE TABLE audits (id TEXT PRIMARY KEY, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
            status TEXT NOT NULL, target TEXT NOT NULL, requester TEXT NOT NULL, verification_id TEXT,
            hosts TEXT NOT NULL, services TEXT NOT NULL, planned INTEGER NOT NULL DEFAULT 0,
            previous_id TEXT REFERENCES audits(id), engine_version TEXT NOT NULL, summary TEXT, error TEXT,
            target_key TEXT);
        CREATE TABLE checks (audit_id TEXT NOT NULL REFERENCES audits(id) ON DELETE CASCADE, seq INTEGER NOT NULL,
            finished_at REAL NOT NULL, service TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL,
            name TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL, confirmed INTEGER NOT NULL,
            fingerprint TEXT, transcript TEXT NOT NULL, detail TEXT NOT NULL, tag TEXT, PRIMARY KEY (audit_id, seq));
        INSERT INTO audits VALUES ('AAAAAAAAAAAAAAAAAAAAAA', 1, 1, 2, 'done', 'self', '192.0.2.1', NULL,
            '["192.0.2.1"]', '["relay"]', 1, NULL, '2026.11.1', '{"relay": "closed", "proxy": null}', NULL,
            'ip:192.0.2.1');
    """)
    conn.execute("INSERT INTO checks VALUES ('AAAAAAAAAAAAAAAAAAAAAA', 1, 2, 'relay', '192.0.2.1', 25, 'relay.v2',"
                 " 'closed', 'relay_denied', 0, NULL, ?, 'refused', NULL)", (json.dumps(full),))
    conn.commit()
    conn.close()
    store = Store(str(path))
    await store.open()
    try:
        assert await store.schema_version() == 5
        audit = await store.get_audit("AAAAAAAAAAAAAAAAAAAAAA")
        result = audit.checks[0].result
        assert result.opening is None and [line.to_dict() for line in result.transcript] == full
        # the migrated database takes new rows with a shared opening
        opening = Opening("k1", [TranscriptLine(0.0, "in", "220 new.example ESMTP")])
        new = CheckResult(service="relay", host="192.0.2.1", port=25, name="relay.v3", verdict=Verdict.CLOSED,
                          reason="relay_denied", transcript=[*opening.lines, TranscriptLine(0.1, "out", "RSET")],
                          opening=opening)
        await store.add_check("AAAAAAAAAAAAAAAAAAAAAA", 2, new)
        again = await store.get_audit("AAAAAAAAAAAAAAAAAAAAAA")
        assert texts_of(again.checks[1].result) == ["220 new.example ESMTP", "RSET"]
        assert texts_of(again.checks[0].result) == [line["text"] for line in full]
    finally:
        await store.close()
