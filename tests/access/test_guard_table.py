"""The public-address guard, table-driven: addresses, and names that resolve to them through FakeDns.

Public addresses appear here only as data (in the tables and in DNS answers on 127.0.0.1); nothing connects to
any of them. Every lookup goes to the FakeDns on loopback (servers= always given).
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from fakes.dns import FakeDns

from app.access.resolver import ResolveError, Resolver
from app.access.targets import ForbiddenTarget, Resolved, check_address, guard, resolve_guarded, why_not_public


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001:0::/32) for this server and client (the client is stored inverted)."""
    s = int(ipaddress.IPv4Address(server))
    c = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (s << 64) | (0x8000 << 48) | (0x63BF << 32) | c))


TEREDO_SERVER = "65.54.227.120"

# (category, address): every one must be refused
FORBIDDEN_ADDRESSES = [
    ("loopback", "127.0.0.1"), ("loopback", "127.1.2.3"), ("loopback", "127.255.255.254"), ("loopback", "::1"),
    ("private 10/8", "10.0.0.1"), ("private 10/8", "10.255.255.254"),
    ("private 172.16/12", "172.16.0.1"), ("private 172.16/12", "172.31.255.254"),
    ("private 192.168/16", "192.168.0.1"), ("private 192.168/16", "192.168.255.254"),
    ("link-local v4", "169.254.0.1"), ("link-local v4", "169.254.169.254"),
    ("link-local v6", "fe80::1"), ("link-local v6", "febf:ffff::1"), ("link-local v6 scoped", "fe80::1%eth0"),
    ("shared 100.64/10", "100.64.0.1"), ("shared 100.64/10", "100.127.255.254"),
    ("multicast v4", "224.0.0.1"), ("multicast v4", "233.252.0.1"), ("multicast v4", "239.255.255.250"),
    ("multicast v6", "ff02::1"), ("multicast v6", "ff05::1:3"), ("multicast v6", "ff0e::1"),
    ("reserved 240/4", "240.0.0.1"), ("reserved 240/4", "254.255.255.254"), ("broadcast", "255.255.255.255"),
    ("documentation", "192.0.2.1"), ("documentation", "198.51.100.7"), ("documentation", "203.0.113.200"),
    ("documentation v6", "2001:db8::1"), ("documentation v6", "2001:db8:ffff:ffff::1"),
    ("documentation v6 3fff::/20", "3fff::1"), ("documentation v6 3fff::/20", "3fff:fff:ffff::1"),
    ("benchmarking", "198.18.0.1"), ("benchmarking", "198.19.255.254"), ("benchmarking v6", "2001:2::1"),
    ("this network 0/8", "0.0.0.1"), ("this network 0/8", "0.1.2.3"), ("this network 0/8", "0.255.255.255"),
    ("IETF 192.0.0/24", "192.0.0.1"), ("IETF 192.0.0/24", "192.0.0.8"), ("IETF 192.0.0/24", "192.0.0.170"),
    ("IETF 192.0.0/24", "192.0.0.255"),
    ("unique-local", "fc00::1"), ("unique-local", "fd00::1"), ("unique-local", "fdff:ffff:ffff::1"),
    ("site-local", "fec0::1"), ("site-local", "feff:ffff::1"),
    ("IPv4-mapped", "::ffff:10.0.0.1"), ("IPv4-mapped", "::ffff:127.0.0.1"), ("IPv4-mapped", "::ffff:192.168.1.1"),
    ("IPv4-mapped", "::ffff:169.254.169.254"), ("IPv4-mapped", "::ffff:100.64.0.1"),
    ("IPv4-mapped", "::ffff:0.0.0.0"), ("IPv4-mapped", "::ffff:255.255.255.255"),
    ("IPv4-mapped", "::ffff:224.0.0.1"),
    ("IPv4-compatible", "::10.0.0.1"), ("IPv4-compatible", "::127.0.0.1"), ("IPv4-compatible", "::192.168.0.1"),
    ("IPv4-compatible", "::169.254.169.254"),
    ("6to4 of private", "2002:0a00:0001::"), ("6to4 of private", "2002:0a00:0001::1"),
    ("6to4 of loopback", "2002:7f00:0001::1"), ("6to4 of private", "2002:c0a8:0101::1"),
    ("6to4 of link-local", "2002:a9fe:a9fe::1"), ("6to4 of 0.0.0.0", "2002::1"),
    ("Teredo, private client", teredo(TEREDO_SERVER, "10.0.0.1")),
    ("Teredo, private client", teredo(TEREDO_SERVER, "192.168.1.1")),
    ("Teredo, loopback client", teredo(TEREDO_SERVER, "127.0.0.1")),
    ("NAT64 of private", "64:ff9b::10.0.0.1"), ("NAT64 of loopback", "64:ff9b::127.0.0.1"),
    ("NAT64 of private", "64:ff9b::192.168.1.1"), ("NAT64 of link-local", "64:ff9b::169.254.169.254"),
    ("local-use NAT64 64:ff9b:1::/48", "64:ff9b:1::1"),
    ("local-use NAT64 64:ff9b:1::/48", "64:ff9b:1::808:808"),
    ("local-use NAT64 64:ff9b:1::/48", "64:ff9b:1:ffff:ffff:ffff:ffff:ffff"),
    ("discard 100::/64", "100::1"), ("discard 100::/64", "100::ffff:ffff:ffff:ffff"),
    ("unspecified", "0.0.0.0"), ("unspecified", "::"),
]

PUBLIC_ADDRESSES = [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "193.0.14.129",
    "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:0808:0808::1",
    teredo(TEREDO_SERVER, "8.8.8.8"), teredo(TEREDO_SERVER, "1.1.1.1"),
    # just outside a forbidden range
    "11.0.0.1", "172.32.0.1", "192.169.0.1", "169.255.0.1", "100.128.0.1", "198.20.0.1", "223.255.254.1",
    "2001:db9::1",
]

# name -> (DNS records, addresses that must be allowed, addresses that must be refused)
FORBIDDEN_NAMES: dict[str, tuple[dict[str, list[str]], set[str], set[str]]] = {
    "private10.evil.test": ({"A": ["10.1.2.3"]}, set(), {"10.1.2.3"}),
    "loopback.evil.test": ({"A": ["127.0.0.1"]}, set(), {"127.0.0.1"}),
    "localhost6.evil.test": ({"AAAA": ["::1"]}, set(), {"::1"}),
    "metadata.evil.test": ({"A": ["169.254.169.254"]}, set(), {"169.254.169.254"}),
    "cgnat.evil.test": ({"A": ["100.64.0.1"]}, set(), {"100.64.0.1"}),
    "rfc1918.evil.test": ({"A": ["172.16.5.4", "192.168.1.1", "10.0.0.1"], "AAAA": ["fec0::1"]},
                          set(), {"172.16.5.4", "192.168.1.1", "10.0.0.1", "fec0::1"}),
    "mixed.test": ({"A": ["8.8.8.8", "10.0.0.1"]}, {"8.8.8.8"}, {"10.0.0.1"}),
    "mixed6.test": ({"A": ["1.1.1.1"], "AAAA": ["fe80::1", "2606:4700:4700::1111"]},
                    {"1.1.1.1", "2606:4700:4700::1111"}, {"fe80::1"}),
    "v6local.test": ({"AAAA": ["fd00::1"]}, set(), {"fd00::1"}),
    # an IPv4-mapped address is the IPv4 address itself: refused (and reported) in that form
    "mapped.test": ({"AAAA": ["::ffff:192.168.1.1"]}, set(), {"192.168.1.1"}),
    "compat.test": ({"AAAA": ["::127.0.0.1"]}, set(), {"::127.0.0.1"}),
    "sixtofour.test": ({"AAAA": ["2002:0a00:0001::1", "2002:0808:0808::1"]},
                       {"2002:0808:0808::1"}, {"2002:0a00:0001::1"}),
    "teredo.test": ({"AAAA": [teredo(TEREDO_SERVER, "10.0.0.1")]}, set(), {teredo(TEREDO_SERVER, "10.0.0.1")}),
    "nat64.test": ({"AAAA": ["64:ff9b::10.0.0.1", "64:ff9b::8.8.8.8"]}, {"64:ff9b::8.8.8.8"}, {"64:ff9b::10.0.0.1"}),
    "nat64local.test": ({"AAAA": ["64:ff9b:1::a00:1"]}, set(), {"64:ff9b:1::a00:1"}),
    "zero.test": ({"A": ["0.0.0.0"], "AAAA": ["::"]}, set(), {"0.0.0.0", "::"}),
    "multicast.test": ({"A": ["224.0.0.251"], "AAAA": ["ff02::fb"]}, set(), {"224.0.0.251", "ff02::fb"}),
    "broadcast.test": ({"A": ["255.255.255.255", "240.1.2.3"]}, set(), {"255.255.255.255", "240.1.2.3"}),
    "docs.test": ({"A": ["192.0.2.1", "198.51.100.1", "203.0.113.1"], "AAAA": ["2001:db8::1", "3fff::1"]},
                  set(), {"192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1", "3fff::1"}),
    "bench.test": ({"A": ["198.18.0.1"], "AAAA": ["2001:2::1"]}, set(), {"198.18.0.1", "2001:2::1"}),
    "ietf.test": ({"A": ["192.0.0.1", "0.1.2.3"]}, set(), {"192.0.0.1", "0.1.2.3"}),
    "discard.test": ({"AAAA": ["100::1"]}, set(), {"100::1"}),
    "ula-and-public.test": ({"A": ["9.9.9.9"], "AAAA": ["fc00::5"]}, {"9.9.9.9"}, {"fc00::5"}),
}

# names reached through a CNAME: the guard judges the final addresses
CNAMES = {
    "alias.evil.test": "private10.evil.test.",
    "www.mixed.test": "mixed.test.",
    "deep.evil.test": "alias.evil.test.",
}
CNAME_EXPECTED = {
    "alias.evil.test": (set(), {"10.1.2.3"}),
    "www.mixed.test": ({"8.8.8.8"}, {"10.0.0.1"}),
    "deep.evil.test": (set(), {"10.1.2.3"}),
}

PUBLIC_NAMES = {
    "public.test": ({"A": ["8.8.8.8", "1.1.1.1"], "AAAA": ["2606:4700:4700::1111"]},
                    {"8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"}),
    # ::ffff:8.8.8.8 is 8.8.8.8, and NAT64's 64:ff9b::8.8.8.8 lands on the same server: tested once
    "public-embedded.test": ({"AAAA": ["::ffff:8.8.8.8", "64:ff9b::8.8.8.8", teredo(TEREDO_SERVER, "8.8.8.8")]},
                             {"8.8.8.8", teredo(TEREDO_SERVER, "8.8.8.8")}),
}


def _records() -> dict[tuple[str, str], list[str]]:
    records: dict[tuple[str, str], list[str]] = {}
    for name, (by_type, *_expected) in {**FORBIDDEN_NAMES, **PUBLIC_NAMES}.items():
        for rdtype, values in by_type.items():
            records[(name, rdtype)] = values
    for name, target in CNAMES.items():
        records[(name, "CNAME")] = [target]
    return records


def _ips(texts) -> set:
    return {ipaddress.ip_address(t) for t in texts}


@pytest.fixture
async def fake_dns():
    async with FakeDns(_records()) as server:
        yield server


@pytest.fixture
def resolver(fake_dns: FakeDns) -> Resolver:
    return Resolver([fake_dns.server], timeout=3.0)


def test_the_table_is_big_enough():
    forbidden_inputs = len(FORBIDDEN_ADDRESSES) + len(FORBIDDEN_NAMES) + len(CNAMES)
    assert forbidden_inputs >= 60, forbidden_inputs
    assert len({a for _c, a in FORBIDDEN_ADDRESSES}) == len(FORBIDDEN_ADDRESSES)


# -- addresses -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("category,address", FORBIDDEN_ADDRESSES, ids=[f"{c}:{a}" for c, a in FORBIDDEN_ADDRESSES])
def test_forbidden_address(category, address):
    ip = ipaddress.ip_address(address)
    reason = why_not_public(ip)
    assert reason, f"{address} ({category}) is not refused"
    assert check_address(address, []) == reason
    with pytest.raises(ForbiddenTarget) as info:
        guard(ip, [])
    assert str(ip) in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_address(address):
    ip = ipaddress.ip_address(address)
    assert why_not_public(ip) is None, f"{address} is public but refused: {why_not_public(ip)}"
    assert check_address(address, []) is None
    guard(ip, [])  # does not raise


def test_teredo_helper_encodes_the_client():
    ip = ipaddress.IPv6Address(teredo(TEREDO_SERVER, "10.0.0.1"))
    assert ip.teredo == (ipaddress.IPv4Address(TEREDO_SERVER), ipaddress.IPv4Address("10.0.0.1"))
    assert teredo(TEREDO_SERVER, "10.0.0.1") == "2001:0:4136:e378:8000:63bf:f5ff:fffe"


def test_embedded_reasons_name_the_inner_address():
    assert "10.0.0.1" in why_not_public(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert "10.0.0.1" in why_not_public(ipaddress.ip_address("2002:0a00:0001::"))
    assert "10.0.0.1" in why_not_public(ipaddress.ip_address(teredo(TEREDO_SERVER, "10.0.0.1")))
    assert "10.0.0.1" in why_not_public(ipaddress.ip_address("64:ff9b::10.0.0.1"))


# -- allow lists (SECURE_ALLOW_NETWORKS) ---------------------------------------------------------------------

LOOPBACK_ALLOWED = [ipaddress.ip_network("127.0.0.0/8")]


def test_allow_list_opens_only_what_it_lists():
    assert check_address("127.0.0.5", LOOPBACK_ALLOWED) is None
    guard(ipaddress.ip_address("127.0.0.5"), LOOPBACK_ALLOWED)
    assert check_address("10.0.0.1", LOOPBACK_ALLOWED)
    with pytest.raises(ForbiddenTarget) as info:
        guard(ipaddress.ip_address("10.0.0.1"), LOOPBACK_ALLOWED)
    assert "10.0.0.1" in str(info.value)
    assert check_address("::1", LOOPBACK_ALLOWED), "an IPv4 allow list must not open IPv6 loopback"


def test_allow_list_of_several_networks():
    allowed = [ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00:1::/64")]
    assert check_address("10.20.3.4", allowed) is None
    assert check_address("fd00:1::7", allowed) is None
    assert check_address("10.21.0.1", allowed)
    assert check_address("fd00:2::7", allowed)
    assert check_address("127.0.0.1", allowed)


async def test_allow_list_applies_to_resolved_names(resolver: Resolver):
    result = await resolve_guarded("loopback.evil.test", resolver, LOOPBACK_ALLOWED)
    assert result.allowed == ("127.0.0.1",) and result.refused == ()
    result = await resolve_guarded("mixed.test", resolver, LOOPBACK_ALLOWED)
    assert result.allowed == ("8.8.8.8",) and [a for a, _why in result.refused] == ["10.0.0.1"]


# -- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORBIDDEN_NAMES))
async def test_forbidden_name(name, resolver: Resolver, fake_dns: FakeDns):
    _records, allowed, refused = FORBIDDEN_NAMES[name]
    result = await resolve_guarded(name, resolver, [])
    assert isinstance(result, Resolved) and result.name == name
    assert _ips(result.allowed) == _ips(allowed)
    assert _ips(a for a, _why in result.refused) == _ips(refused)
    for address, why in result.refused:
        assert why and why == why_not_public(ipaddress.ip_address(address))
    assert all(q[0] == name for q in fake_dns.queries)


@pytest.mark.parametrize("name", sorted(CNAMES))
async def test_forbidden_name_behind_cname(name, resolver: Resolver):
    allowed, refused = CNAME_EXPECTED[name]
    result = await resolve_guarded(name, resolver, [])
    assert _ips(result.allowed) == _ips(allowed)
    assert _ips(a for a, _why in result.refused) == _ips(refused)


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
async def test_public_name(name, resolver: Resolver):
    _records, allowed = PUBLIC_NAMES[name]
    result = await resolve_guarded(name, resolver, [])
    assert _ips(result.allowed) == _ips(allowed)
    assert result.refused == ()


async def test_missing_name_has_nothing_to_test(resolver: Resolver):
    result = await resolve_guarded("missing.evil.test", resolver, [])
    assert result.allowed == () and result.refused == ()


async def test_a_failing_lookup_is_an_error_not_an_empty_pass(resolver: Resolver, fake_dns: FakeDns):
    fake_dns.servfail.add("broken.evil.test")
    with pytest.raises(ResolveError):
        await resolve_guarded("broken.evil.test", resolver, [])


# -- DNS rebinding: what the guard saw is pinned ---------------------------------------------------------------


async def test_resolved_is_pinned_when_the_name_rebinds(resolver: Resolver, fake_dns: FakeDns):
    fake_dns.set("rebind.evil.test", "A", ["8.8.8.8"])
    first = await resolve_guarded("rebind.evil.test", resolver, [])
    assert first.allowed == ("8.8.8.8",) and first.refused == ()

    fake_dns.set("rebind.evil.test", "A", ["127.0.0.1"])
    fake_dns.set("rebind.evil.test", "AAAA", ["::1"])
    second = await resolve_guarded("rebind.evil.test", resolver, [])
    assert second.allowed == ()
    assert _ips(a for a, _why in second.refused) == _ips(["127.0.0.1", "::1"])

    # the first answer is a frozen value: the change did not reach it, and nothing can change it
    assert first == Resolved("rebind.evil.test", ("8.8.8.8",), ())
    assert isinstance(first.allowed, tuple) and isinstance(first.refused, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.allowed = ("127.0.0.1",)  # type: ignore[misc]
    assert fake_dns.queries.count(("rebind.evil.test", "A")) == 2
