"""Which addresses a fetched URL may reach (service/url/addresses.py), on their own."""

from __future__ import annotations

import ipaddress

import pytest

from service.url.addresses import AllowList, ipv4_literal, judge


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
        ("::ffff:93.184.215.14", True),
        ("64:ff9b::5db8:d70e", True),  # NAT64 of a public address
        ("127.0.0.1", False),
        ("127.0.0.2", True),  # listed
        ("::ffff:127.0.0.2", True),  # the same socket as the listed address
        ("64:ff9b::7f00:2", False),  # a translator's address: the list does not reach through
        ("10.9.8.7", False),
        ("10.20.0.1", True),  # listed network
        ("100.100.100.100", False),
        ("169.254.169.254", False),
        ("192.0.0.170", False),
        ("198.18.0.1", False),
        ("255.255.255.255", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::1", False),
        ("::127.0.0.1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("fc00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("2001:db8::1", False),
    ],
)
def test_address_rules(address: str, allowed: bool) -> None:
    allow = AllowList.parse(["127.0.0.2", "10.20.0.0/16"])
    assert judge(ipaddress.ip_address(address), "h.test", allow).allowed is allowed


def test_allow_list_names_and_limits() -> None:
    allow = AllowList.parse(
        ["bucket.internal", " 10.0.0.0/8 ", "fd00::/8", "[fd00::1]", "0.0.0.0/0"]
    )
    private, loop = ipaddress.ip_address("172.16.0.1"), ipaddress.ip_address("127.0.0.1")
    assert judge(private, "bucket.internal", allow).allowed
    assert judge(private, "BUCKET.internal.", allow).allowed
    # A listed name never reaches loopback, and nothing reaches 0.0.0.0 or multicast.
    names = AllowList.parse(["bucket.internal"])
    assert not judge(loop, "bucket.internal", names).allowed
    assert judge(loop, "x", allow).allowed  # 0.0.0.0/0 lists it
    assert not judge(ipaddress.ip_address("0.0.0.0"), "x", allow).allowed
    assert not judge(ipaddress.ip_address("224.0.0.1"), "x", allow).allowed
    with pytest.raises(ValueError, match="neither"):
        AllowList.parse(["http://bucket/"])


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7F.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("1.2.3.4.", "1.2.3.4"),
        ("example.com", None),
        ("1.example", None),
        ("::1", None),
    ],
)
def test_numeric_hosts(host: str, expected: str | None) -> None:
    got = ipv4_literal(host)
    assert (None if got is None else str(got)) == expected


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.1.1.1", "1.16777216", "08.1", "a.1"])
def test_numeric_hosts_that_are_no_address(host: str) -> None:
    with pytest.raises(ValueError, match=r"IPv4|parts"):
        ipv4_literal(host)
