import ipaddress

import pytest

from app.access.targets import ForbiddenTarget, guard, why_not_public

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
