"""Which addresses a fetched URL may reach: public unicast ones, and what the operator lists.

Everything a server-side request could be turned against is refused unless listed: loopback,
private and shared (carrier-grade NAT) networks, link-local ones (the cloud metadata service at
169.254.169.254 among them), multicast, reserved, documentation and unspecified addresses, and
every IPv6 form that carries an IPv4 address (IPv4-mapped and -compatible, NAT64, 6to4, Teredo)
when the address it carries would be refused. The table is written out here rather than taken
from ``ipaddress``'s ``is_private`` and ``is_global``, whose definitions changed between Python
releases.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AllowList", "IPAddress", "Verdict", "ipv4_literal", "judge"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*spec: tuple[str, str]) -> tuple[tuple[_Network, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in spec)


# IANA's IPv4 and IPv6 special-purpose address registries, less what is globally reachable.
_REFUSED_V4 = _nets(
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata services live there)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
)
_REFUSED_V6 = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (Teredo among them)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
# Never reachable, even when an allow list covers them: the unspecified address connects to the
# machine itself, and multicast or broadcast is no server.
_NEVER = ("unspecified", "multicast", "reserved (and broadcast)")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    why: str  # for a refusal: what kind of address it is


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 transition form carries, and the form's name."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    return None


def _category(addr: IPAddress) -> str | None:
    """Why ``addr`` is refused by default, or None for a public unicast address."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None:
            why = _category(inner[0])
            return None if why is None else f"{inner[1]} form of a {why} address"
        table: tuple[tuple[_Network, str], ...] = _REFUSED_V6
    else:
        table = _REFUSED_V4
    for net, why in table:
        if addr in net:
            return why
    return None


class AllowList:
    """Hosts (by name, exactly) and networks that a URL may reach although they are not public
    (``U2SERVE_URL_ALLOW``). Loopback is reached only through an entry that lists it."""

    def __init__(self, hosts: Iterable[str] = (), networks: Iterable[_Network] = ()) -> None:
        self.hosts = frozenset(h.lower().rstrip(".") for h in hosts)
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Each entry an address, a network in CIDR notation, or a host name; ValueError names
        an entry that is none of them."""
        hosts: list[str] = []
        networks: list[_Network] = []
        for raw in entries:
            entry = raw.strip().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            labels = entry.rstrip(".").split(".")
            if "/" in entry or not all(
                label and len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
                for label in labels
            ):
                raise ValueError(
                    f"url_allow: {raw!r} is neither an address, a network (10.0.0.0/8, "
                    "fd00::/8) nor a host name"
                )
            hosts.append(entry)
        return cls(hosts, networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def covers(self, addr: IPAddress) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # the same socket as the IPv4 address it maps
        return any(addr.version == net.version and addr in net for net in self.networks)


def judge(addr: IPAddress, host: str, allow: AllowList) -> Verdict:
    """May a connection for ``host`` go to ``addr``?"""
    why = _category(addr)
    if why is None:
        return Verdict(True, "public")
    if any(never in why for never in _NEVER):
        return Verdict(False, why)
    by_name = "loopback" not in why and host.lower().rstrip(".") in allow.hosts
    if allow.covers(addr) or by_name:
        return Verdict(True, f"{why}, allowed by U2SERVE_URL_ALLOW")
    return Verdict(False, why)


def _ipv4_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part[1:], 8)
    return int(part, 10)


def ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The address a host written as a number means to a browser or to ``inet_aton``
    (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``), or None for a host name.

    A host whose last label is a number is an address or invalid (ValueError), never a name:
    otherwise a resolver could read the same spelling as an address the checks never saw.
    """
    if ":" in host:  # IPv6
        return None
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    last = parts[-1]
    hexadecimal = last[:2].lower() == "0x" and all(c in "0123456789abcdefABCDEF" for c in last[2:])
    if not (last.isdigit() and last.isascii()) and not hexadecimal:
        return None
    if len(parts) > 4:
        raise ValueError(f"{host!r} has too many parts for an IPv4 address")
    try:
        numbers = [_ipv4_part(p) for p in parts]
    except ValueError:
        raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(f"{host!r} is out of the IPv4 range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)
