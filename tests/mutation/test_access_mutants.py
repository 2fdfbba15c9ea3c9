"""The address guard, address spellings and the requester (app/access/), pinned where mutants survived.

The guard's reasons are what the owner reads when a target is refused, so each is pinned word for word; the
requester key and the forwarding chains decide whose limits a request counts against.
"""

from __future__ import annotations

import ipaddress

import pytest
from starlette.requests import Request

from app.access import targets
from app.access.addresses import budget_key, requester_key
from app.access.requester import MAX_HOPS, RequesterError, forwarded_chain, parse_address, requester_address
from app.access.targets import ForbiddenTarget, embedded_ipv4, guard, why_not_public

ip = ipaddress.ip_address


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", "it is a loopback address (the computer itself)"),
    ("224.0.0.1", "it is a multicast address"),
    ("169.254.1.1", "it is a link-local address (valid only on one local network segment)"),
    ("::", "it is the unspecified address"),
    ("fec0::1", "it is a site-local IPv6 address"),
    ("64:ff9b:1::1", "it is a local-use NAT64 address"),
    ("10.0.0.1", "it is a private or reserved address, not reachable from the Internet"),
    ("4000::1", "it is a reserved address"),  # IPv6 space the IANA has not allocated
    ("::ffff:10.0.0.1", "it embeds the IPv4 address 10.0.0.1, and it is a private or reserved address, "
                        "not reachable from the Internet"),
])
def test_each_reason_is_said_in_plain_words(address, reason):
    assert why_not_public(ip(address)) == reason


def test_the_refusal_tells_the_owner_what_to_do_instead():
    with pytest.raises(ForbiddenTarget) as info:
        guard(ip("10.0.0.1"), [])
    assert str(info.value) == (
        "We only test servers on the public Internet. The address 10.0.0.1 cannot be tested because it is a private "
        "or reserved address, not reachable from the Internet. If you are behind a company network or a VPN, run the "
        "test from the server itself or prove a domain you control.")


@pytest.mark.parametrize("address,inner", [
    ("::1", None),  # loopback, not ::0.0.0.1
    ("::", None),
    ("::2", "0.0.0.2"),  # the smallest IPv4-compatible form
    ("::8.8.8.8", "8.8.8.8"),
    ("::1:0:0", None),  # bit 32 set: not an IPv4-compatible address (and not a valid IPv4 one)
    ("::1:808:808", None),
])
def test_ipv4_compatible_forms_are_exactly_the_low_32_bits(address, inner):
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (str(found) if found is not None else None) == inner


@pytest.mark.parametrize("text,key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # one subscriber holds a whole /64
])
def test_requester_keys(text, key):
    assert requester_key(text) == key


def test_requester_key_prefix_is_configurable():
    assert requester_key("2001:db8:1:2:3:4:5:6", 48) == "2001:db8:1::/48"


def request(peer: str, headers: list[tuple[str, str]]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    return Request({"type": "http", "client": (peer, 1234), "headers": raw, "method": "GET", "path": "/"})


def test_forwarded_elements_without_for_are_unknown_hops():
    req = request("10.0.0.1", [("Forwarded", "for=192.0.2.60,by=203.0.113.43"), ("Forwarded", "for=198.51.100.7")])
    assert forwarded_chain(req, "forwarded") == ["192.0.2.60", "unknown", "198.51.100.7"]


def test_forwarded_elements_are_split_at_commas_even_without_spaces():
    req = request("10.0.0.1", [("Forwarded", "for=192.0.2.60,for=198.51.100.7")])
    assert str(requester_address(req, [ipaddress.ip_network("10.0.0.0/8")], "forwarded")) == "198.51.100.7"


def test_an_unknown_hop_behind_a_trusted_proxy_is_refused():
    req = request("10.0.0.1", [("Forwarded", "for=192.0.2.60, by=203.0.113.43")])
    with pytest.raises(RequesterError):
        requester_address(req, [ipaddress.ip_network("10.0.0.0/8")], "forwarded")


@pytest.mark.parametrize("text,key", [
    ("::8.8.8.8", "8.8.8.8"),  # IPv4-compatible: the same server's budget
    ("::2", "0.0.0.2"),
    ("::1", "::1"),  # loopback, not ::0.0.0.1
    ("::1:0:0", "::1:0:0"),  # bit 32 set: not IPv4-compatible
    ("64:ff9b::8.8.8.8", "8.8.8.8"),
    ("::ffff:8.8.8.8", "8.8.8.8"),
])
def test_budget_keys(text, key):
    assert budget_key(text) == key


WIDE = [ipaddress.ip_network("10.0.0.0/8")]


def test_no_peer_address_is_an_error_that_says_so():
    req = Request({"type": "http", "client": None, "headers": [], "method": "GET", "path": "/"})
    with pytest.raises(RequesterError) as info:
        requester_address(req, WIDE)
    assert str(info.value) == "the connection has no peer address"


def test_an_untrusted_peer_is_the_requester_however_long_its_chain():
    chain = ", ".join(["198.51.100.7"] * (MAX_HOPS + 5))
    assert str(requester_address(request("203.0.113.9", [("X-Forwarded-For", chain)]), WIDE)) == "203.0.113.9"


def test_a_chain_of_max_hops_is_read_and_one_more_is_refused():
    hops = ["198.51.100.7"] + ["10.0.0.2"] * (MAX_HOPS - 1)
    assert str(requester_address(request("10.0.0.1", [("X-Forwarded-For", ", ".join(hops))]), WIDE)) == "198.51.100.7"
    with pytest.raises(RequesterError) as info:
        requester_address(request("10.0.0.1", [("X-Forwarded-For", ", ".join(["10.0.0.2"] + hops))]), WIDE)
    assert str(info.value) == "too many forwarding hops"


@pytest.mark.parametrize("text,address", [
    ("[2001:db8::1]:443]", "2001:db8::1"),  # the address is what the first brackets hold
    ("fe80::1%eth0%1", "fe80::1"),  # the zone is everything after the first %
    ('"192.0.2.1:80"', "192.0.2.1"),
])
def test_requester_address_forms(text, address):
    assert str(parse_address(text)) == address


def test_junk_around_an_address_is_refused_with_the_text_quoted():
    with pytest.raises(RequesterError):
        parse_address("X192.0.2.1")
    with pytest.raises(RequesterError) as info:
        parse_address("y" * 70)
    assert str(info.value) == "not an IP address: " + repr("y" * 60)


@pytest.mark.parametrize("text", ["[::1", "::1]"])
def test_a_listener_address_needs_both_brackets(text):
    with pytest.raises(ValueError):
        targets.parse_address(text)


def test_a_listener_zone_is_everything_after_the_first_percent():
    assert str(targets.parse_address("fe80::1%eth0%1")) == "fe80::1"
