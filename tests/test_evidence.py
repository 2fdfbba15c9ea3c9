"""Bounded evidence (issue 10, part 9): a relay session's opening dialogue is stored once and referenced by its
rows; one audit keeps at most 1 MiB of transcript; the API, the event stream and the page stay bounded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tracemalloc

from fakes import smtp as fakes
from support import relay_port, running_app

from app import PROJECT_ROOT
from app.audits import CUT_NOTE, EVIDENCE_BUDGET, Auditor, EvidenceBudget
from app.config import Settings
from app.guides import GuideLibrary
from app.probes.smtp import VARIANTS_PER_SESSION
from app.store import Store
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict
from app.web.common import check_json

MIB = 1024 * 1024
NOTE_ROOM = 256  # bytes a row may add beyond the budget: the cut marker, or our sink's delivery note


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
        # comparing with a previous audit reads verdicts only
        bare = await store.get_audit(audit.id, transcripts=False)
        assert [(s.result.name, s.result.verdict) for s in bare.checks] == \
            [(s.result.name, s.result.verdict) for s in loaded.checks]
        assert all(s.result.transcript == [] and s.result.opening is None for s in bare.checks)
        public = check_json(loaded.checks[0].result, GuideLibrary(PROJECT_ROOT / "guides"), Settings())
        assert set(public) == {"service", "host", "port", "name", "verdict", "reason", "confirmed", "fingerprint",
                               "transcript", "detail", "description", "guides"}  # as the README's API says: no
        # internal `opening` (nor the sink `tag`)
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
        assert await store.schema_version() == 6
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


# --- the budget ------------------------------------------------------------------------------------------------
def _row(name: str, lines: list[TranscriptLine], opening: Opening | None = None) -> CheckResult:
    return CheckResult(service="relay", host="192.0.2.1", port=25, name=name, verdict=Verdict.OPEN,
                       reason="accepted_unconfirmed", transcript=lines, opening=opening, detail="accepted",
                       tag="sys0123456789abcdef", fingerprint={"product": "Postfix", "version": None, "raw": "x"})


def _cost(lines: list[TranscriptLine]) -> int:
    return sum(len(json.dumps(line.to_dict())) + 1 for line in lines)


def test_the_budget_cuts_lines_never_verdicts():
    opening = Opening("s1", [TranscriptLine(0.0, "in", "220 " + "g" * 300)])
    own = [TranscriptLine(0.1, "out", f"RCPT TO:<{i}>") for i in range(4)]
    limit = _cost(list(opening.lines)) * 2 + _cost(own) + _cost(own[:2])  # room for two rows and a half
    budget = EvidenceBudget(limit)
    first = _row("relay.v1", [*opening.lines, *own], opening)
    assert budget.admit(first) is first  # within the budget: untouched
    second = budget.admit(_row("relay.v2", [*opening.lines, *own], opening))
    assert second.opening is opening  # its opening still fits, then its own lines that fit, then the marker
    assert [line.text for line in second.transcript] == [opening.lines[0].text, own[0].text, own[1].text, CUT_NOTE]
    third = budget.admit(_row("relay.v3", [*opening.lines, *own], opening))
    assert [line.text for line in third.transcript] == [CUT_NOTE] and third.opening is None
    small = budget.admit(_row("relay.v4", [TranscriptLine(0.0, "info", "x")]))
    assert [line.text for line in small.transcript] == [CUT_NOTE]  # once spent, every later row is cut
    for row in (second, third, small):
        assert (row.verdict, row.reason, row.detail, row.tag, row.fingerprint["product"]) == \
            (Verdict.OPEN, "accepted_unconfirmed", "accepted", "sys0123456789abcdef", "Postfix")
    assert budget.spent <= limit


def test_an_opening_that_no_longer_fits_whole_is_shown_as_far_as_it_fits():
    opening = Opening("s1", [TranscriptLine(0.0, "in", f"220-{i} " + "g" * 100) for i in range(3)])
    budget = EvidenceBudget(_cost(list(opening.lines[:2])))
    row = budget.admit(_row("relay.v1", [*opening.lines, TranscriptLine(0.1, "out", "RSET")], opening))
    assert row.opening is None  # not referenced: the store keeps no more than the row shows
    assert [line.text for line in row.transcript] == [opening.lines[0].text, opening.lines[1].text, CUT_NOTE]
    assert budget.spent <= budget.limit


def test_a_shared_opening_counts_for_every_row_that_shows_it():
    opening = Opening("s1", [TranscriptLine(0.0, "in", "220 " + "g" * 1000)])
    limit = 3 * _cost(list(opening.lines)) + 10
    budget = EvidenceBudget(limit)
    rows = [budget.admit(_row(f"relay.v{i}", list(opening.lines), opening)) for i in range(1, 6)]
    assert [r.opening is opening for r in rows] == [True, True, True, False, False]
    assert EVIDENCE_BUDGET == MIB


# --- the whole site: 32 hostile hosts --------------------------------------------------------------------------
async def test_an_audit_of_32_hostile_hosts_keeps_its_evidence_bounded(settings, tmp_path):
    policy = fakes.HugeGreeting(binary=True)  # escaped, each greeting shows as about 60 KiB of text
    first, last = greeting_texts(policy)
    first_shown = "220-huge.test.example greeting line 00 "  # its printable beginning; the rest shows escaped
    hosts = tuple(f"127.0.0.{i}" for i in range(1, 33))
    async with fakes.FakeSmtpServer(policy, hosts) as server:
        settings.relay_ports = [server.port]
        settings.audit_deadline = 60
        async with running_app(settings) as client:
            auditor = client.app.state.sys.auditor
            audit = await auditor.start(target="self", requester="127.0.0.1", hosts=list(hosts), services=["relay"])
            await asyncio.wait_for(asyncio.shield(auditor._tasks[audit.id]), 90)
            peaks = {}
            for name, path in (("api", f"/api/v1/audits/{audit.id}"), ("page", f"/audits/{audit.id}"),
                               ("events", f"/api/v1/audits/{audit.id}/events")):
                tracemalloc.start()
                try:
                    peaks[name] = (await client.get(path), tracemalloc.get_traced_memory()[1])
                finally:
                    tracemalloc.stop()
    (response, api_peak), (page, page_peak), (events, events_peak) = peaks["api"], peaks["page"], peaks["events"]
    # what the site allocates at most while reading the audit and answering (the client's copy included); on main
    # the answers alone were 51, 40 and 52 MiB
    assert max(api_peak, page_peak, events_peak) < 24 * MIB, (api_peak, page_peak, events_peak)
    db = settings.database_url.removeprefix("sqlite:///")
    rows_count = 32 * 22
    row_bytes, opening_bytes = stored_bytes(db)
    assert row_bytes + opening_bytes <= MIB + rows_count * NOTE_ROOM  # on main: 50 MiB

    assert response.status_code == 200
    data = response.json()
    assert len(response.content) < 3 * MIB  # on main: 51 MiB
    checks = data["checks"]
    assert len(checks) == rows_count
    # verdicts and reasons are whole whatever the evidence budget did
    assert {(c["verdict"], c["reason"]) for c in checks} == {("closed", "relay_denied")}
    assert data["summary"]["relay"] == "closed"
    texts = [[line["text"] for line in c["transcript"]] for c in checks]
    whole = [t for t in texts if t[-1] != CUT_NOTE]
    cut = [t for t in texts if t[-1] == CUT_NOTE]
    assert whole and cut and len(whole) + len(cut) == rows_count
    for t in whole:  # a row that kept its evidence shows its session's whole greeting, then its own dialogue
        assert any(x.startswith(first_shown) for x in t) and t[-1].startswith("verdict: closed")
    assert all(c["transcript"] and set(c["transcript"][0]) == {"t", "dir", "text"} for c in checks)
    assert all("opening" not in c for c in checks)
    # every stored opening is used by a row that shows it whole; none is stored twice
    conn = sqlite3.connect(db)
    used = conn.execute("SELECT COUNT(DISTINCT opening) FROM checks WHERE opening IS NOT NULL").fetchone()[0]
    stored = conn.execute("SELECT COUNT(*) FROM openings").fetchone()[0]
    conn.close()
    assert used == stored > 0

    assert page.status_code == 200 and len(page.content) < 3 * MIB  # on main: 40 MiB
    assert "transcript cut: this audit" in page.text
    assert len(events.content) < 3 * MIB and events.text.count("event: check") == rows_count
