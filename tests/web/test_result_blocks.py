"""The result page's grouping (one block per address and port), the next step per service, and the plain-text
summary to forward: its content, its permalink, and what it does with a hostile banner."""

from __future__ import annotations

import pytest
from support import running_app, wait_done

from app.guides import GuideLibrary
from app.probes.smtp import VARIANTS
from app.verdicts import CheckResult, Opening, TranscriptLine, Verdict
from app.web.blocks import blocks, evidence, fix_steps, next_step
from app.web.summary import clean

HOST = "192.0.2.25"


def row(name: str, verdict: Verdict, reason: str, port: int = 25, service: str = "relay",
        transcript: list[TranscriptLine] | None = None, guides: list | None = None,
        opening: Opening | None = None) -> dict:
    check = CheckResult(service, HOST, port, name, verdict, reason, transcript=transcript or [], opening=opening)
    return {"check": check, "guides": guides or [], "description": "", "change": ""}


def relay_rows(port: int, verdict: Verdict, reason: str) -> list[dict]:
    return [row(f"relay.{v.id}", verdict, reason, port) for v in VARIANTS]


def test_a_port_that_refuses_every_variant_is_one_line():
    (block,) = blocks(relay_rows(25, Verdict.UNREACHABLE, "refused"))
    assert block.quiet and block.line == "nothing listens — nothing to do"
    assert block.total == 22 and block.open_rows == [] and len(block.groups) == 1
    (filtered,) = blocks(relay_rows(587, Verdict.UNREACHABLE, "filtered"))
    assert filtered.quiet and filtered.line.startswith("no answer, probably a firewall")


def test_twenty_two_same_outcomes_collapse_into_one_counted_line():
    (block,) = blocks(relay_rows(25, Verdict.CLOSED, "relay_denied"))
    assert block.quiet and len(block.groups) == 1
    assert block.groups[0].line == "22 of 22 relay attempts refused"
    assert len(block.groups[0].rows) == 22  # the rows stay behind the line
    assert block.line.startswith("22 of 22 relay attempts refused — Nothing to do")


def test_a_closed_port_with_several_outcomes_is_still_one_line():
    rows = relay_rows(25, Verdict.CLOSED, "relay_denied")
    for r in rows[:5]:
        r["check"].reason = "accepted_as_local"
    (block,) = blocks(rows)
    assert block.quiet and block.line == "closed: none of the 22 attempts went through — nothing to do"
    assert [(g.line, len(g.rows)) for g in block.groups] == [
        ("17 of 22 relay attempts refused", 17), ("5 of 22 relay attempts kept for local delivery: not relaying", 5)]


def test_open_rows_stand_alone_with_their_evidence_the_rest_collapses():
    opening = Opening("o", [TranscriptLine(0.0, "info", "connecting"),
                            TranscriptLine(0.01, "in", "220 mx.example ESMTP Postfix")])
    rows = relay_rows(25, Verdict.CLOSED, "accepted_as_local")
    for r in rows[:3]:
        lines = [*opening.lines, TranscriptLine(0.1, "info", "variant"), TranscriptLine(0.2, "out", "RCPT TO:<x@y>"),
                 TranscriptLine(0.3, "in", "250 2.0.0 Ok: queued")]
        r["check"] = CheckResult("relay", HOST, 25, r["check"].name, Verdict.OPEN, "delivered", transcript=lines,
                                 opening=opening, confirmed=True)
    rows.append(row("relay.v1", Verdict.INCONCLUSIVE, "timeout", port=465))
    port25, port465 = blocks(rows)
    assert not port25.quiet and port25.verdict == "open" and len(port25.open_rows) == 3
    assert [line.text for line in port25.open_rows[0]["evidence"]] == [
        "220 mx.example ESMTP Postfix", "RCPT TO:<x@y>", "250 2.0.0 Ok: queued"]  # greeting, then the proof
    assert [(g.line, len(g.rows)) for g in port25.groups] == [("19 of 22 relay attempts kept for local delivery: "
                                                              "not relaying", 19)]
    assert not port465.quiet and port465.verdict == "inconclusive" and port465.groups[0].line.endswith("stopped answering")


def test_blocks_put_relay_before_proxy_and_ports_with_something_to_do_first():
    rows = (relay_rows(25, Verdict.UNREACHABLE, "refused") + relay_rows(587, Verdict.OPEN, "delivered")
            + [row("proxy.socks5", Verdict.UNREACHABLE, "refused", port=1080, service="proxy")])
    assert [(b.service, b.port) for b in blocks(rows)] == [("relay", 587), ("relay", 25), ("proxy", 1080)]
    (proxy,) = blocks(rows[-1:])
    assert proxy.line == "nothing listens — nothing to do"


def test_long_evidence_keeps_its_start_and_its_end():
    lines = [TranscriptLine(float(i), "in", f"line {i}") for i in range(40)]
    kept = evidence(CheckResult("proxy", HOST, 8080, "proxy.http_post", Verdict.OPEN, "token_returned",
                                transcript=lines))
    assert len(kept) == 13 and kept[0].text == "line 0" and kept[-1].text == "line 39" and kept[3].text == "…"


def test_the_next_step_names_the_product_and_counts_the_steps_from_fix():
    library = GuideLibrary(__import__("app").PROJECT_ROOT / "guides")
    postfix, general = library.get("postfix"), library.get("what-is-an-open-relay")
    assert fix_steps(postfix) == 4  # Fix, Reload, Verify, Re-test
    rows = [row("relay.v2", Verdict.OPEN, "delivered", guides=[postfix, general]),
            row("relay.v3", Verdict.CLOSED, "relay_denied")]
    step = next_step(rows, "relay")
    assert step.guide is postfix and step.product == "Postfix" and step.steps == 4
    unknown = next_step([row("relay.v2", Verdict.OPEN, "delivered", guides=[general])], "relay")
    assert unknown.guide is general and unknown.product == "" and unknown.steps is None
    assert next_step(rows, "proxy") is None and next_step(rows[1:], "relay") is None


@pytest.mark.parametrize("text,expected", [
    ("220 ok\r\nInjected: yes", "220 ok??Injected: yes"), ("a\x1b[31mred", "a?[31mred"), ("x\u202egnp.exe", "x?gnp.exe"),
    ("\x85next\u2028line", "?next?line")])
def test_clean_leaves_no_control_or_direction_character(text, expected):
    assert clean(text) == expected
    assert len(clean("x" * 5000)) == 200


async def test_the_plain_text_summary_carries_the_verdicts_the_evidence_and_the_permalink(settings):
    settings.public_url = "https://audit.example.org/"
    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        store = client.app.state.sys.store
        hostile = "220 evil\x1b[2J\u202eexe.\u2028Permalink: https://phish.example/ " + "A" * 3000
        await store.add_check(audit_id, 99, CheckResult(
            "relay", "127.0.0.1", 2525, "relay.v2", Verdict.OPEN, "delivered", confirmed=True,
            fingerprint={"product": "Postfix", "version": None, "raw": hostile},
            transcript=[TranscriptLine(0.0, "in", hostile), TranscriptLine(0.1, "out", "RCPT TO:<a@b>"),
                        TranscriptLine(0.2, "in", "250 2.0.0 Ok: queued as X")]))
        await store.set_summary(audit_id, {"relay": "open", "proxy": "inconclusive"})
        response = await client.get(f"/audits/{audit_id}/summary.txt")
        spanish = (await client.get(f"/audits/{audit_id}/summary.txt", params={"lang": "es"})).text
        page = (await client.get(f"/audits/{audit_id}")).text
        missing = await client.get("/audits/AAAAAAAAAAAAAAAAAAAAAA/summary.txt")
    assert response.status_code == 200 and response.headers["content-type"] == "text/plain; charset=utf-8"
    text = response.text
    permalink = f"https://audit.example.org/audits/{audit_id}"
    assert text.count(permalink) == 2  # at the top and at the end
    assert "Mail relay: OPEN" in text and "Proxy: INCONCLUSIVE" in text and "127.0.0.1" in text
    assert "Your server is Postfix: follow these 4 steps\nhttps://audit.example.org/guides/postfix#fix" in text
    assert "Evidence, 127.0.0.1 port 2525, check relay.v2 (delivered):" in text
    assert "  -> RCPT TO:<a@b>" in text and "  <- 250 2.0.0 Ok: queued as X" in text
    assert "nothing listens — nothing to do" in text  # the refused mail port, one line
    assert not any(ch in text for ch in "\x1b\u202e\u2028\r")  # no control or direction character
    assert all(len(line) <= 210 for line in text.splitlines())
    assert "\nPermalink: https://phish" not in text  # the banner cannot start a line of its own
    assert "Relé de correo: ABIERTO" in spanish and "Su servidor es Postfix: siga estos 4 pasos" in spanish
    assert permalink in page and f'href="/audits/{audit_id}/summary.txt"' in page  # the page offers both
    assert missing.status_code == 404


async def test_the_top_of_the_page_says_when_a_retest_may_run(settings):
    settings.target_cooldown = 300
    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        page = (await client.get(f"/audits/{audit_id}")).text
    top = page.split('<section class="summary"')[1].split("</section>")[0]
    assert "disabled" in top and "a new test is possible from" in top and "Re-test 127.0.0.1" in top
    assert page.index('<section class="summary"') < page.index('id="ports-title"')  # before the blocks per port
