"""The blocklist probe against a loopback DNS server of the test's own that answers as each shipped list would:
listed with each documented code, not listed, the lists' "query refused" codes, an answer outside 127.0.0.0/8,
SERVFAIL, a list that never answers, and a dead port. No query ever leaves the machine."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from fakes.dns import FakeDns
from support import free_port

from app.access.resolver import Resolver
from app.probes.blocklist import (
    Blocklist, BlocklistFileError, BlocklistOptions, MemoryCache, ask, load_lists, parse_lists, run_address,
)
from app.verdicts import CheckResult, Verdict

LISTS = load_lists("data/blocklists.toml")
BY_ID = {b.id: b for b in LISTS}
ADDRESS = "192.0.2.7"


def reversed_name(blocklist: Blocklist, address: str = ADDRESS) -> str:
    name = blocklist.query_name(address)
    assert name is not None
    return name


async def probe(server: str, address: str = ADDRESS, cache: MemoryCache | None = None, timeout: float = 2.0,
                cache_seconds: float = 900.0, lists: tuple[Blocklist, ...] = LISTS) -> dict[str, CheckResult]:
    rows: list[CheckResult] = []

    async def emit(result: CheckResult) -> None:
        rows.append(result)
    options = BlocklistOptions(lists, (server,), timeout, cache_seconds, cache or MemoryCache())
    await run_address(emit, address, options)
    assert [r.name for r in rows] == [f"blocklist.{b.id}" for b in lists]  # one row per list, in the file's order
    return {r.name.removeprefix("blocklist."): r for r in rows}


# --- the shipped file ---------------------------------------------------------------------------------------------

def test_the_shipped_file_has_the_issues_lists_each_fact_with_a_source():
    assert set(BY_ID) >= {"spamhaus-zen", "spamcop", "barracuda", "uceprotect-1", "psbl", "mailspike", "dronebl",
                          "efnet-rbl"}
    for blocklist in LISTS:
        assert blocklist.sources and all(s.startswith("http") for s in blocklist.sources)
        assert blocklist.removal_url.startswith("https://") and blocklist.removal and blocklist.removal_time
        assert blocklist.codes and all(code.source.startswith("http") for code in blocklist.codes)
    zen = BY_ID["spamhaus-zen"]
    parts = {code.part for code in zen.codes}
    assert {"SBL", "CSS", "XBL", "PBL"} <= parts
    assert all(zen.code(f"127.255.255.{n}").kind == "refused" for n in (252, 253, 254, 255))
    assert not zen.public_resolvers and not BY_ID["barracuda"].public_resolvers
    # both IRC lists name open proxies, which our proxy verdict explains
    for list_id in ("dronebl", "efnet-rbl"):
        assert any(code.kind == "proxy" and "proxy" in code.explained_by for code in BY_ID[list_id].codes)


GOOD = """
[[list]]
id = "one"
name = "One"
zone = "bl.example.test"
lists = "x"
ipv6 = false
removal_url = "https://example.test/remove"
removal = "ask"
automatic_removal = false
removal_time = "a day"
public_resolvers = true
sources = ["https://example.test/"]
  [[list.code]]
  answer = "127.0.0.2"
  part = "p"
  meaning = "m"
  kind = "spam"
  source = "https://example.test/codes"
"""


@pytest.mark.parametrize("change, message", [
    (("[[list]]", "[[lists]]"), "no [[list]] entries"),
    (('id = "one"', 'id = "One!"'), "'id' is not valid"),
    (('zone = "bl.example.test"', 'zone = "bl example"'), "'zone' is not valid"),
    (('answer = "127.0.0.2"', 'answer = "10.0.0.2"'), "inside 127.0.0.0/8"),
    (('answer = "127.0.0.2"', 'answer = "127.0.0.9-127.0.0.3"'), "first <= last"),
    (('answer = "127.0.0.2"', 'answer = "127.0.0.2-128.0.0.1"'), "inside 127.0.0.0/8"),  # the end outside
    (('answer = "127.0.0.2"', 'answer = "127.0.0.x"'), "'answer' must be an IPv4 address or a range a-b"),
    (('kind = "spam"', 'kind = "evil"'), "'kind' must be one of"),
    (('sources = ["https://example.test/"]', "sources = []"), "'sources' must be"),
    (('source = "https://example.test/codes"', 'source = "nowhere"'), "'source' is not valid"),
    (("ipv6 = false", 'ipv6 = "no"'), "'ipv6' must be true or false"),
    (('removal_url = "https://example.test/remove"', ""), "'removal_url' must be a non-empty string"),
    (("id = ", "= "), "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_what_is_wrong(change, message):
    old, new = change
    with pytest.raises(BlocklistFileError, match=re.escape(message)):
        parse_lists(GOOD.replace(old, new, 1), "lists.toml")


def test_a_duplicate_id_and_a_missing_file_are_refused(tmp_path):
    with pytest.raises(BlocklistFileError, match="used twice"):
        parse_lists(GOOD + GOOD.replace("[[list]]\n", "[[list]]\n", 1))
    with pytest.raises(BlocklistFileError, match="cannot be read"):
        load_lists(str(tmp_path / "missing.toml"))
    assert parse_lists(GOOD)[0].code("127.0.0.2") is not None


def test_a_bad_blocklists_file_stops_the_site_at_start(tmp_path):
    from app.config import Settings
    from app.main import create_app

    bad = tmp_path / "lists.toml"
    bad.write_text(GOOD.replace('kind = "spam"', 'kind = "evil"'))
    with pytest.raises(BlocklistFileError, match=f"{bad}, list 1, code 1: 'kind'"):
        create_app(Settings(blocklists_file=str(bad)))


# --- answers as each list gives them ------------------------------------------------------------------------------

CASES = [(b.id, code) for b in LISTS for code in b.codes]


@pytest.mark.parametrize("list_id, code", CASES, ids=[f"{i}-{c.first}" for i, c in CASES])
async def test_every_documented_code_of_every_list_is_read_as_the_list_means_it(list_id, code):
    blocklist = BY_ID[list_id]
    name = reversed_name(blocklist)
    records = {(name, "A"): [str(code.first)]}
    if code.kind != "refused":
        records[(name, "TXT")] = ['"Listed, see https://example.test/lookup?ip=192.0.2.7"']
    async with FakeDns(records) as dns_server:
        rows = await probe(dns_server.server)
    result = rows[list_id]
    if code.kind == "refused":  # never a listing: the list refused our resolver
        assert (result.verdict, result.reason) == (Verdict.INCONCLUSIVE, "list_refused_query")
        assert "refused the query" in result.detail and (name, "TXT") not in dns_server.queries
        assert code.meaning in result.detail  # why: the list's own words for its refusal code
        assert result.data is not None and result.data["codes"] == [str(code.first)]
    else:
        assert result.verdict is Verdict.LISTED
        assert result.reason == {"spam": "listed_spam", "exploited": "listed_exploited", "proxy": "listed_proxy",
                                 "policy": "listed_policy", "reputation": "listed_reputation"}[code.kind]
        assert result.data is not None and result.data["codes"] == [str(code.first)]
        assert result.data["txt"] == ["Listed, see https://example.test/lookup?ip=192.0.2.7"]
        assert code.part in result.detail
    assert result.data is not None and result.data["removal_url"] == blocklist.removal_url
    others = [r for i, r in rows.items() if i != list_id]
    assert all((r.verdict, r.reason) == (Verdict.NOT_LISTED, "not_listed") for r in others)  # NXDOMAIN
    assert result.host == ADDRESS and result.port == 0 and result.service == "blocklist"


def test_the_name_asked_is_the_address_reversed_under_the_zone():
    zen = BY_ID["spamhaus-zen"]
    assert zen.query_name("192.0.2.7") == "7.2.0.192.zen.spamhaus.org"
    assert zen.query_name("2001:db8::1") == "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org"
    assert BY_ID["spamcop"].query_name("2001:db8::1") is None  # SpamCop publishes no IPv6


def test_a_code_covers_only_ipv4_answers_in_its_range():
    pbl = next(c for c in BY_ID["spamhaus-zen"].codes if c.part.startswith("PBL"))
    assert pbl.covers(str(pbl.first)) and pbl.covers(str(pbl.last))
    assert not pbl.covers("127.0.0.2") and not pbl.covers("not an address") and not pbl.covers("::1")


async def test_a_row_shows_the_question_and_the_list_s_answer():
    zen = BY_ID["spamhaus-zen"]
    async with FakeDns({("7.2.0.192.zen.spamhaus.org", "A"): ["127.0.0.2"],
                        ("7.2.0.192.zen.spamhaus.org", "TXT"): ['"https://check.spamhaus.org/" "query/ip/192.0.2.7"',
                                                                '"\\255\\254 not UTF-8"']}) as dns_server:
        rows = await probe(dns_server.server)
    row = rows["spamhaus-zen"]
    assert (row.verdict, row.host) == (Verdict.LISTED, ADDRESS)
    assert row.transcript[0].text == "A? 7.2.0.192.zen.spamhaus.org" and row.transcript[0].dir == "out"
    # a TXT record's strings are one text; bytes that are not UTF-8 are replaced, not a failed lookup
    assert row.data is not None
    assert row.data["txt"] == ["https://check.spamhaus.org/query/ip/192.0.2.7", "\ufffd\ufffd not UTF-8"]
    assert zen.query_name(ADDRESS) in {q[0] for q in dns_server.queries}


async def test_a_listing_stands_when_its_reason_text_cannot_be_read():
    zen = BY_ID["spamhaus-zen"]
    name = reversed_name(zen)
    async with FakeDns({(name, "A"): ["127.0.0.4"], (name, "TXT"): ['"XBL"']}) as dns_server:
        dns_server.servfail_types.add((name, "TXT"))
        rows = await probe(dns_server.server)
    row = rows["spamhaus-zen"]
    assert (row.verdict, row.reason) == (Verdict.LISTED, "listed_exploited")
    assert row.data is not None and row.data["codes"] == ["127.0.0.4"] and row.data["txt"] == []


async def test_a_failed_and_a_timed_out_lookup_say_which_and_why():
    dronebl, efnet = BY_ID["dronebl"], BY_ID["efnet-rbl"]
    async with FakeDns({}) as dns_server:
        dns_server.servfail.add(reversed_name(dronebl))
        dns_server.slow.add(reversed_name(efnet))
        resolver = Resolver([dns_server.server], timeout=0.5)
        failed = await ask(resolver, dronebl, reversed_name(dronebl))
        timed_out = await ask(resolver, efnet, reversed_name(efnet))
    assert failed.status == "failed" and "failed to answer" in (failed.note or "")
    assert timed_out.status == "timeout" and "timed out" in (timed_out.note or "")
    async with FakeDns({}) as dns_server:
        dns_server.servfail.add(reversed_name(dronebl))
        rows = await probe(dns_server.server)
    assert "failed to answer" in rows["dronebl"].detail  # the reason reaches the row, not just "no answer"


async def test_zen_with_several_codes_takes_the_most_pressing_reason():
    zen = BY_ID["spamhaus-zen"]
    async with FakeDns({(reversed_name(zen), "A"): ["127.0.0.2", "127.0.0.4", "127.0.0.10"]}) as dns_server:
        rows = await probe(dns_server.server)
    row = rows["spamhaus-zen"]
    assert (row.verdict, row.reason) == (Verdict.LISTED, "listed_exploited")
    assert row.data is not None and row.data["codes"] == ["127.0.0.2", "127.0.0.4", "127.0.0.10"]
    assert "SBL" in row.detail and "XBL" in row.detail and "PBL" in row.detail


async def test_an_undocumented_code_and_an_answer_outside_loopback():
    spamcop, psbl = BY_ID["spamcop"], BY_ID["psbl"]
    async with FakeDns({(reversed_name(spamcop), "A"): ["127.0.0.77"],
                        (reversed_name(psbl), "A"): ["198.51.100.1"]}) as dns_server:
        rows = await probe(dns_server.server)
    assert (rows["spamcop"].verdict, rows["spamcop"].reason) == (Verdict.LISTED, "listed_other")
    assert (rows["psbl"].verdict, rows["psbl"].reason) == (Verdict.INCONCLUSIVE, "list_bad_answer")
    assert rows["psbl"].data is not None and rows["psbl"].data["codes"] == ["198.51.100.1"]
    assert "198.51.100.1" in rows["psbl"].detail  # what the list answered, for the visitor to see


async def test_servfail_and_a_list_that_never_answers_are_inconclusive_within_the_time_limit():
    dronebl, efnet = BY_ID["dronebl"], BY_ID["efnet-rbl"]
    async with FakeDns({}) as dns_server:
        dns_server.servfail.add(reversed_name(dronebl))
        dns_server.slow.add(reversed_name(efnet))
        started = time.monotonic()
        rows = await probe(dns_server.server, timeout=1.0)
        elapsed = time.monotonic() - started
    assert (rows["dronebl"].verdict, rows["dronebl"].reason) == (Verdict.INCONCLUSIVE, "list_failed")
    assert (rows["efnet-rbl"].verdict, rows["efnet-rbl"].reason) == (Verdict.INCONCLUSIVE, "list_timeout")
    assert rows["spamcop"].verdict is Verdict.NOT_LISTED
    assert elapsed < 5  # one time limit for all the lists together (they are asked in parallel)


async def test_a_dead_dns_port_gives_inconclusive_rows_never_a_listing():
    rows = await probe(f"127.0.0.1:{free_port()}", timeout=1.0)
    assert {r.verdict for r in rows.values()} == {Verdict.INCONCLUSIVE}
    assert {r.reason for r in rows.values()} <= {"list_timeout", "list_failed"}


async def test_ipv6_is_asked_in_nibble_form_of_the_lists_that_publish_it_and_not_of_the_others():
    address = "2001:db8::1"
    nibbles = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    async with FakeDns({(f"{nibbles}.zen.spamhaus.org", "A"): ["127.0.0.3"]}) as dns_server:
        rows = await probe(dns_server.server, address=address)
    assert (rows["spamhaus-zen"].verdict, rows["spamhaus-zen"].reason) == (Verdict.LISTED, "listed_spam")
    for blocklist in LISTS:
        if not blocklist.ipv6:
            row = rows[blocklist.id]
            assert (row.verdict, row.reason, row.host) == (Verdict.INCONCLUSIVE, "ipv6_not_queried", address)
            assert not any(q[0].endswith(blocklist.zone) for q in dns_server.queries)
    assert (f"{nibbles}.zen.spamhaus.org", "A") in dns_server.queries


async def test_answers_are_cached_per_address_and_failures_are_not():
    zen, spamcop = BY_ID["spamhaus-zen"], BY_ID["spamcop"]
    cache = MemoryCache()
    async with FakeDns({(reversed_name(zen), "A"): ["127.0.0.2"]}) as dns_server:
        dns_server.servfail.add(reversed_name(spamcop))
        await probe(dns_server.server, cache=cache)
        first = len(dns_server.queries)
        dns_server.remove(reversed_name(zen), "A")  # delisted meanwhile: the cache still serves the listing
        dns_server.servfail.discard(reversed_name(spamcop))
        rows = await probe(dns_server.server, cache=cache)
        again = dns_server.queries[first:]
    assert again == [(reversed_name(spamcop), "A")]  # only the list that failed is asked again
    assert rows["spamhaus-zen"].verdict is Verdict.LISTED and rows["spamhaus-zen"].data["cached_at"] is not None
    assert any("served from our cache" in line.text for line in rows["spamhaus-zen"].transcript)
    assert rows["spamcop"].verdict is Verdict.NOT_LISTED
    async with FakeDns({}) as dns_server:  # with the cache off, every list is asked every time
        rows = await probe(dns_server.server, cache=cache, cache_seconds=0)
    assert rows["spamhaus-zen"].verdict is Verdict.NOT_LISTED and len(dns_server.queries) == len(LISTS)


async def test_answers_are_kept_only_when_the_cache_time_is_positive():
    async with FakeDns({}) as dns_server:
        off, short = MemoryCache(), MemoryCache()
        await probe(dns_server.server, cache=off, cache_seconds=0)
        await probe(dns_server.server, cache=short, cache_seconds=1)
    assert await off.blocklist_answers(ADDRESS, 0) == {}
    assert len(await short.blocklist_answers(ADDRESS, 0)) == len(LISTS)


async def test_the_store_keeps_the_answers_for_every_process(store):
    zen = BY_ID["spamhaus-zen"]
    async with FakeDns({(reversed_name(zen), "A"): ["127.0.0.4"]}) as dns_server:
        rows: list[CheckResult] = []

        async def emit(result: CheckResult) -> None:
            rows.append(result)
        await run_address(emit, ADDRESS, BlocklistOptions(LISTS, (dns_server.server,), 2.0, 900.0, store))
        stored = await store.blocklist_answers(ADDRESS, time.time() - 900)
    assert json.loads(stored["spamhaus-zen"][0]) == {"status": "listed", "codes": ["127.0.0.4"], "txt": []}
    assert json.loads(stored["spamcop"][0])["status"] == "not_listed" and len(stored) == len(LISTS)
    assert await store.blocklist_answers(ADDRESS, time.time() + 1) == {}  # older than asked for: not served


async def test_queries_for_many_addresses_at_once_stay_bounded():
    """Several audits at once: every list of every address answered, none dropped by the in-flight bound."""
    async with FakeDns({}) as dns_server:
        results = await asyncio.gather(*(probe(dns_server.server, address=f"192.0.2.{n}") for n in range(1, 7)))
    assert all(r.verdict is Verdict.NOT_LISTED for rows in results for r in rows.values())
    assert len(dns_server.queries) == 6 * len(LISTS)


def test_an_operators_file_replaces_the_shipped_one(tmp_path):
    copy = tmp_path / "lists.toml"
    copy.write_text(Path("data/blocklists.toml").read_text())
    assert [b.id for b in load_lists(str(copy))] == [b.id for b in LISTS]
