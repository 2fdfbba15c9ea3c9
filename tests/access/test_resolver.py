"""app.access.resolver.Resolver against FakeDns on 127.0.0.1 (no query ever leaves loopback: servers= always)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes.dns import FakeDns

from app.access.resolver import MAX_ANSWERS, ResolveError, Resolver

RECORDS = {
    ("both.test", "A"): ["192.0.2.1", "192.0.2.2", "192.0.2.1"],
    ("both.test", "AAAA"): ["2001:db8::1", "2001:DB8:0:0::1", "2001:db8::2"],
    ("v6only.test", "AAAA"): ["2001:db8::5"],
    ("mail.test", "MX"): ["30 mx3.mail.test.", "10 MX1.mail.test.", "20 mx2.mail.test."],
    ("mail.test", "A"): ["192.0.2.25"],
    ("nullmx.test", "MX"): ["0 ."],
    ("txt.test", "TXT"): ['"v=spf1 -all"', '"part one " "part two"'],
    ("_token.txt.test", "TXT"): ['"token-123"'],
    ("www.chain.test", "CNAME"): ["hop.chain.test."],
    ("hop.chain.test", "CNAME"): ["end.chain.test."],
    ("end.chain.test", "A"): ["192.0.2.80"],
    ("end.chain.test", "AAAA"): ["2001:db8::80"],
    ("end.chain.test", "TXT"): ['"at the end"'],
    ("dangling.chain.test", "CNAME"): ["nowhere.chain.test."],
    ("loop1.chain.test", "CNAME"): ["loop2.chain.test."],
    ("loop2.chain.test", "CNAME"): ["loop1.chain.test."],
    ("many.test", "A"): [f"198.51.100.{i}" for i in range(1, 41)],
    ("many.test", "AAAA"): [f"2001:db8::{i:x}" for i in range(1, 41)],
    ("manytxt.test", "TXT"): [f'"text {i}"' for i in range(40)],
    ("manymx.test", "MX"): [f"{i} mx{i}.manymx.test." for i in range(40, 0, -1)],
}


@pytest.fixture
async def fake_dns():
    async with FakeDns(RECORDS) as server:
        yield server


@pytest.fixture
def resolver(fake_dns: FakeDns) -> Resolver:
    return Resolver([fake_dns.server], timeout=3.0)


def test_server_is_on_loopback(fake_dns: FakeDns):
    assert fake_dns.server == f"127.0.0.1:{fake_dns.port}"
    assert fake_dns.port > 0


async def test_addresses_a_then_aaaa_without_duplicates(resolver: Resolver, fake_dns: FakeDns):
    assert await resolver.addresses("both.test") == ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"]
    assert fake_dns.queries == [("both.test", "A"), ("both.test", "AAAA")]


async def test_addresses_a_before_aaaa_when_the_server_rotates():
    async with FakeDns(RECORDS, shuffle=True) as server:
        resolver = Resolver([server.server], timeout=3.0)
        for _ in range(5):
            found = await resolver.addresses("both.test")
            assert len(found) == len(set(found)) == 4
            assert set(found[:2]) == {"192.0.2.1", "192.0.2.2"}
            assert set(found[2:]) == {"2001:db8::1", "2001:db8::2"}


async def test_addresses_are_case_insensitive(resolver: Resolver, fake_dns: FakeDns):
    assert await resolver.addresses("BoTh.TeSt.") == ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"]


async def test_addresses_ipv6_only(resolver: Resolver):
    assert await resolver.addresses("v6only.test") == ["2001:db8::5"]


async def test_nxdomain_is_empty(resolver: Resolver, fake_dns: FakeDns):
    assert await resolver.addresses("missing.test") == []
    assert await resolver.mx("missing.test") is None
    assert await resolver.txt("missing.test") == []
    assert ("missing.test", "A") in fake_dns.queries


async def test_name_with_other_types_only_is_empty(resolver: Resolver):
    assert await resolver.addresses("txt.test") == []
    assert await resolver.mx("txt.test") is None


async def test_mx_sorted_by_preference_lower_case(resolver: Resolver):
    assert await resolver.mx("mail.test") == [(10, "mx1.mail.test"), (20, "mx2.mail.test"), (30, "mx3.mail.test")]


async def test_no_mx_is_none(resolver: Resolver):
    assert await resolver.mx("both.test") is None


async def test_null_mx_is_empty_list(resolver: Resolver):
    assert await resolver.mx("nullmx.test") == []


async def test_txt_strings_are_joined(resolver: Resolver):
    assert sorted(await resolver.txt("txt.test")) == ["part one part two", "v=spf1 -all"]
    assert await resolver.txt("_token.txt.test") == ["token-123"]


async def test_servfail_is_resolve_error(resolver: Resolver, fake_dns: FakeDns):
    fake_dns.servfail.add("broken.test")
    with pytest.raises(ResolveError) as info:
        await resolver.addresses("broken.test")
    assert "broken.test" in str(info.value)
    with pytest.raises(ResolveError):
        await resolver.mx("broken.test")
    with pytest.raises(ResolveError):
        await resolver.txt("broken.test")


async def test_servfail_even_for_a_name_with_records(resolver: Resolver, fake_dns: FakeDns):
    fake_dns.servfail.add("both.test")
    with pytest.raises(ResolveError):
        await resolver.addresses("both.test")
    fake_dns.servfail.discard("both.test")
    assert await resolver.addresses("both.test")


async def test_slow_name_times_out_quickly(fake_dns: FakeDns):
    fake_dns.slow.add("slow.test")
    resolver = Resolver([fake_dns.server], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ResolveError) as info:
        await asyncio.wait_for(resolver.addresses("slow.test"), 5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed
    assert "timed out" in str(info.value)
    assert ("slow.test", "A") in fake_dns.queries


async def test_slow_name_does_not_block_others(fake_dns: FakeDns):
    fake_dns.slow.add("slow.test")
    resolver = Resolver([fake_dns.server], timeout=0.5)
    with pytest.raises(ResolveError):
        await resolver.txt("slow.test")
    assert await resolver.addresses("v6only.test") == ["2001:db8::5"]


async def test_cname_chain_is_followed(resolver: Resolver, fake_dns: FakeDns):
    assert await resolver.addresses("www.chain.test") == ["192.0.2.80", "2001:db8::80"]
    assert await resolver.txt("www.chain.test") == ["at the end"]
    # one question per type: the server answered the whole chain, the client did not chase it
    assert fake_dns.queries.count(("www.chain.test", "A")) == 1
    assert ("hop.chain.test", "A") not in fake_dns.queries


async def test_dangling_cname_is_empty(resolver: Resolver):
    assert await resolver.addresses("dangling.chain.test") == []


async def test_cname_loop_ends(resolver: Resolver):
    # the fake stops after a bounded chain; the client must end too (empty answer or a plain error, no hang)
    try:
        result = await asyncio.wait_for(resolver.addresses("loop1.chain.test"), 10)
    except ResolveError:
        return
    assert result == []


async def test_addresses_capped(resolver: Resolver, fake_dns: FakeDns):
    found = await resolver.addresses("many.test")
    assert len(found) == 2 * MAX_ANSWERS  # at most MAX_ANSWERS per record type
    assert found[:MAX_ANSWERS] == [f"198.51.100.{i}" for i in range(1, MAX_ANSWERS + 1)]
    assert all(":" in a for a in found[MAX_ANSWERS:])
    # 40 A records do not fit 512 bytes: the fake sent TC and the answer came over TCP
    assert ("many.test", "A") in fake_dns.tcp_queries


async def test_txt_and_mx_capped(resolver: Resolver):
    assert len(await resolver.txt("manytxt.test")) == MAX_ANSWERS
    hosts = await resolver.mx("manymx.test")
    assert hosts is not None and 0 < len(hosts) <= MAX_ANSWERS
    assert hosts == sorted(hosts)


async def test_answers_change_at_runtime(resolver: Resolver, fake_dns: FakeDns):
    fake_dns.set("moving.test", "A", ["192.0.2.10"])
    assert await resolver.addresses("moving.test") == ["192.0.2.10"]
    fake_dns.set("MOVING.test.", "A", ["192.0.2.11"])
    assert await resolver.addresses("moving.test") == ["192.0.2.11"]  # no cache between lookups
    fake_dns.remove("moving.test", "A")
    assert await resolver.addresses("moving.test") == []


async def test_malformed_packets_are_ignored(fake_dns: FakeDns, resolver: Resolver):
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                       remote_addr=("127.0.0.1", fake_dns.port))
    try:
        for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x00" * 40, b"x" * 5000):
            transport.sendto(junk)
    finally:
        transport.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_dns.port)
    writer.write(b"\x00\x05hello")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert await resolver.addresses("v6only.test") == ["2001:db8::5"]


async def test_tcp_framing_directly(fake_dns: FakeDns):
    import dns.asyncquery
    import dns.message

    query = dns.message.make_query("both.test", "A")
    response = await dns.asyncquery.tcp(query, "127.0.0.1", port=fake_dns.port, timeout=3)
    assert sorted(r.address for r in response.answer[0]) == ["192.0.2.1", "192.0.2.2"]
    udp = await dns.asyncquery.udp(query, "127.0.0.1", port=fake_dns.port, timeout=3)
    assert udp.answer == response.answer


async def test_two_servers_on_one_host_keep_their_own_ports():
    from app.access.resolver import Resolver

    async with FakeDns({("a.test", "A"): ["192.0.2.1"]}) as first, FakeDns({("a.test", "A"): ["192.0.2.1"]}) as second:
        resolver = Resolver([first.server, second.server])
        for _ in range(4):
            assert await resolver.addresses("a.test") == ["192.0.2.1"]
        assert first.queries or second.queries
        ports = {ns.port for ns in resolver._resolver.nameservers}
        assert ports == {first.port, second.port}
