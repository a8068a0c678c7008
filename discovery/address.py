"""Addresses: the IPv4 option validator, host name syntax, and a bind host resolved to IPv4."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket

from .record import DiscoveryError

WILDCARDS = ("0.0.0.0", "*", "")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def ipv4_address(value: str) -> str:
    """argparse type: an IPv4 address, normalised."""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IPv4 address (the interface's own address, "
                                         "e.g. 192.168.1.20)") from None


def is_host_name(text: str) -> bool:
    """Whether `text` is a DNS host name (RFC 1123 labels; an all-numeric one is not, as '300.1.1.1')."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def resolve_ipv4(host: str) -> str:
    """The IPv4 address a daemon bound to `host` listens on: an address as it is, a wildcard
    as it is, 'localhost' as 127.0.0.1, an interface name (as ZeroMQ takes it) as its first
    IPv4 address, a host name as it resolves. DiscoveryError says what is wrong."""
    if host in WILDCARDS:
        return host
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if host.lower() in ("localhost", "localhost."):
        return "127.0.0.1"
    try:
        ipaddress.IPv6Address(host.strip("[]"))
    except ValueError:
        pass
    else:
        raise DiscoveryError(f"cannot announce {host!r}: mDNS announces IPv4 only; listen on an IPv4 address "
                             "or pass --no-announce")
    import ifaddr  # a zeroconf dependency

    for adapter in ifaddr.get_adapters():
        if host in (adapter.name, adapter.nice_name):
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    return ip.ip
            raise DiscoveryError(f"interface {host!r} has no IPv4 address to announce; listen on an IPv4 "
                                 "address or pass --no-announce")
    if is_host_name(host):
        try:
            return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
        except (OSError, UnicodeError):
            pass
    raise DiscoveryError(f"cannot announce {host!r}: not an IPv4 address, an interface name or a host name "
                         "that resolves; listen on an IPv4 address (--host 127.0.0.1, 0.0.0.0) or pass --no-announce")
