import ipaddress

import pytest
from starlette.requests import Request

from app.access.requester import RequesterError, parse_address, requester_address

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


def request(peer: str, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "client": (peer, 1234), "headers": raw, "method": "GET", "path": "/"})


XFF, FWD = "x-forwarded-for", "forwarded"


@pytest.mark.parametrize("peer,headers,trusted,header,expected", [
    ("203.0.113.1", {"X-Forwarded-For": "8.8.8.8"}, TRUSTED, XFF, "203.0.113.1"),  # untrusted peer: header ignored
    ("203.0.113.1", {"X-Forwarded-For": "8.8.8.8"}, [], XFF, "203.0.113.1"),
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, TRUSTED, XFF, "198.51.100.7"),
    ("10.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}, TRUSTED, XFF, "198.51.100.7"),  # spoofed left part
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7, 10.0.0.2"}, TRUSTED, XFF, "198.51.100.7"),  # two trusted hops
    ("10.0.0.1", {}, TRUSTED, XFF, "10.0.0.1"),
    ("10.0.0.1", {"Forwarded": 'for="[2001:db8:cafe::17]:4711"'}, TRUSTED, FWD, "2001:db8:cafe::17"),
    ("10.0.0.1", {"Forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43", "X-Forwarded-For": "1.1.1.1"},
     TRUSTED, FWD, "192.0.2.60"),
    # the header the proxy does not set is passed on from the client: it is never read
    ("10.0.0.1", {"Forwarded": "for=192.0.2.60", "X-Forwarded-For": "198.51.100.7"}, TRUSTED, XFF, "198.51.100.7"),
    ("10.0.0.1", {"Forwarded": "for=192.0.2.60"}, TRUSTED, XFF, "10.0.0.1"),
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, TRUSTED, FWD, "10.0.0.1"),
    ("10.0.0.1", {"X-Forwarded-For": "198.51.100.7:5555"}, TRUSTED, XFF, "198.51.100.7"),
    ("::ffff:203.0.113.5", {}, [], XFF, "203.0.113.5"),
])
def test_requester_address(peer, headers, trusted, header, expected):
    assert str(requester_address(request(peer, headers), trusted, header)) == expected


@pytest.mark.parametrize("headers,header", [({"X-Forwarded-For": "not-an-ip"}, XFF), ({"Forwarded": "for=unknown"}, FWD),
                                            ({"X-Forwarded-For": ",".join(["10.0.0.1"] * 50)}, XFF)])
def test_junk_from_a_trusted_proxy_is_an_error(headers, header):
    with pytest.raises(RequesterError):
        requester_address(request("10.0.0.1", headers), TRUSTED, header)


def test_parse_address_forms():
    assert str(parse_address("[::1]:80")) == "::1"
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"
    with pytest.raises(RequesterError):
        parse_address("example.com")
