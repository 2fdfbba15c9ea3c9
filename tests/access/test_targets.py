import ipaddress

import pytest

from app.access.targets import ForbiddenTarget, Listener, guard, is_own_listener, why_not_public

FORBIDDEN = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255",
    "240.0.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1", "192.0.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:0a00:0001::1", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    "64:ff9b::10.0.0.1", "64:ff9b:1::1", "::127.0.0.1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "193.0.14.129", "2001:4860:4860::8888", "2606:4700:4700::1111",
          "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:0808:0808::1"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden(address):
    ip = ipaddress.ip_address(address)
    assert why_not_public(ip), address
    with pytest.raises(ForbiddenTarget) as info:
        guard(ip, [])
    assert str(ip) in str(info.value)


@pytest.mark.parametrize("address", PUBLIC)
def test_public(address):
    assert why_not_public(ipaddress.ip_address(address)) is None


def test_allow_networks_opens_only_what_they_list():
    allowed = [ipaddress.ip_network("127.0.0.0/8")]
    guard(ipaddress.ip_address("127.0.0.9"), allowed)
    with pytest.raises(ForbiddenTarget):
        guard(ipaddress.ip_address("10.0.0.1"), allowed)


# --- the site's own listeners, in every form of their address (issue 10) -----------------------------------
PUB4 = "93.184.216.34"  # stands for the site's public IPv4 address (SECURE_PUBLIC_ADDRESSES)
PUB6 = "2606:2800:220:1:248:1893:25c8:1946"  # and its public IPv6 address
LOOP25 = [Listener("127.0.0.1", 25)]
ANY4 = [Listener("0.0.0.0", 25), Listener("0.0.0.0", 443)]
ANY6 = [Listener("::", 25), Listener("::", 443)]

OWN = [
    # (why, target, port, listeners, site addresses, own?)
    ("mapped", "::ffff:127.0.0.1", 25, LOOP25, (), True),
    ("mapped, hex", "::ffff:7f00:1", 25, LOOP25, (), True),
    ("mapped, bracketed", "[::ffff:127.0.0.1]", 25, LOOP25, (), True),
    ("IPv4-compatible", "::127.0.0.1", 25, LOOP25, (), True),
    ("NAT64", "64:ff9b::7f00:1", 25, LOOP25, (), True),
    ("6to4", "2002:7f00:1::1", 25, LOOP25, (), True),
    ("the address itself", "127.0.0.1", 25, LOOP25, (), True),
    ("listener written mapped", "127.0.0.1", 25, [Listener("::ffff:127.0.0.1", 25)], (), True),
    ("v6 loopback bracketed", "[::1]", 25, [Listener("::1", 25)], (), True),
    ("zone id", "fe80::1%eth0", 25, [Listener("fe80::1", 25)], (), True),
    ("loopback vs 0.0.0.0", "127.0.0.1", 25, ANY4, (), True),
    ("any loopback vs 0.0.0.0", "127.0.0.2", 25, ANY4, (), True),
    ("mapped loopback vs 0.0.0.0", "::ffff:127.0.0.1", 25, ANY4, (), True),
    ("private vs 0.0.0.0", "10.1.2.3", 25, ANY4, (), True),
    ("link-local vs ::", "fe80::1%eth0", 25, ANY6, (), True),
    ("the unspecified address itself", "0.0.0.0", 25, ANY4, (), True),
    ("public address, sink on 25", PUB4, 25, ANY4, (PUB4,), True),
    ("public address, TLS canary on 443", PUB4, 443, ANY4, (PUB4,), True),
    ("public address mapped", f"::ffff:{PUB4}", 25, ANY4, (PUB4,), True),
    ("public address via NAT64", f"64:ff9b::{PUB4}", 443, ANY4, (PUB4,), True),
    ("public address written mapped in the setting", PUB4, 25, ANY4, (f"::ffff:{PUB4}",), True),
    ("v6 public address vs ::", PUB6, 25, ANY6, (PUB6,), True),
    ("v6 public address bracketed vs ::", f"[{PUB6}]", 443, ANY6, (PUB6,), True),
    ("v4 public address vs :: (dual-stack)", PUB4, 25, ANY6, (PUB4,), True),
    ("v4 loopback vs :: (dual-stack)", "127.0.0.1", 25, ANY6, (), True),
    ("v6 loopback vs ::", "::1", 25, ANY6, (), True),
    ("a listener on a name covers its port", PUB4, 25, [Listener("localhost", 25)], (), True),
    ("public address on a listener bound there", f"::ffff:{PUB4}", 25, [Listener(PUB4, 25)], (), True),
    # not own
    ("a different port", "127.0.0.1", 26, LOOP25, (), False),
    ("a different port, mapped", "::ffff:127.0.0.1", 587, ANY4, (PUB4,), False),
    ("a different port, public", PUB4, 587, ANY4, (PUB4,), False),
    ("another loopback address than the bound one", "127.0.0.2", 25, LOOP25, (), False),
    ("a foreign address", "8.8.8.8", 25, ANY4, (PUB4,), False),
    ("a foreign address mapped", "::ffff:8.8.8.8", 443, ANY4, (PUB4,), False),
    ("a foreign v6 address", "2001:4860:4860::8888", 25, ANY6, (PUB6,), False),
    ("a public address not listed as ours", PUB4, 25, ANY4, (), False),
    ("our public address, listener bound to loopback only", PUB4, 25, LOOP25, (PUB4,), False),
]


@pytest.mark.parametrize("why,target,port,listeners,site,own", OWN, ids=[row[0] for row in OWN])
def test_own_listener_in_every_form(why, target, port, listeners, site, own):
    assert is_own_listener(target, port, listeners, site) is own
    if not target.startswith("["):  # the parsed address says the same as its text
        assert is_own_listener(ipaddress.ip_address(target), port, listeners, site) is own


def test_own_listener_keeps_its_three_argument_form():
    assert is_own_listener(ipaddress.ip_address("::ffff:127.0.0.1"), 25, LOOP25)
    assert not is_own_listener(ipaddress.ip_address("8.8.8.8"), 25, ANY4)
