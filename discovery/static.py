"""Static peers: daemons named as `host:port`, for networks multicast does not reach (a VPN).

`StaticPeers` is a `PeerSource`: a thread asks each daemon HELLO and STATUS every
`interval_s` and builds the same `PeerRecord` mDNS would carry. A daemon that does not
answer leaves the table (a remove event) and comes back when it answers again.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from .address import is_host_name
from .base import PeerSource
from .record import DiscoveryError, is_decimal, record_from_daemon

log = logging.getLogger(__name__)


def parse_address(spec: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); host an IPv4 address, a host name or (bracketed) an
    IPv6 address. DiscoveryError says what is wrong."""
    text = spec.strip()
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not is_decimal(port) or not 0 < int(port) < 65536:
        raise DiscoveryError(f"static peer {spec!r} is not HOST:PORT (for example 10.8.0.2:5599)")
    if ":" in host or bracketed:
        try:
            if not bracketed:
                raise ValueError
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DiscoveryError(f"static peer {spec!r}: write an IPv6 address as [ADDRESS]:PORT") from None
    elif not _ipv4(host) and not is_host_name(host):
        raise DiscoveryError(f"static peer {spec!r}: {host!r} is neither an IPv4 address nor a host name")
    return host, int(port)


def _ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


class StaticPeers(PeerSource):
    def __init__(self, addresses: list[str], interval_s: float = 3.0, timeout_s: float = 2.0):
        """`interval_s`: seconds between polls of each daemon; `timeout_s`: per request."""
        super().__init__()
        self.addresses = [parse_address(a) for a in addresses]
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node_of: dict[tuple[str, int], str] = {}
        self._down: set[tuple[str, int]] = set()  # logged as unreachable, until it answers again

    def start(self) -> "StaticPeers":
        if self._thread is None and self.addresses:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="comfy-mesh-static-peers", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s * 2 + 1)
            self._thread = None

    def poll_once(self) -> None:
        """Ask every daemon once (the thread calls this every `interval_s`)."""
        for host, port in self.addresses:
            if self._stop.is_set():
                return
            self._poll(host, port)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # a bug in one poll must not end discovery
                log.exception("static peers: poll failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _poll(self, host: str, port: int) -> None:
        import zmq

        from ..daemon.client import DaemonClient, PeerError

        key = (host, port)
        endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        try:
            try:
                client = DaemonClient(endpoint, timeout_s=self.timeout_s, name="comfy-mesh-discovery")
            except zmq.ZMQError as exc:  # ZeroMQ refused the endpoint itself
                raise PeerError(f"cannot connect to {endpoint}: {exc}; check the address") from None
            with client:
                hello = client.hello()
                status = client.status()
            record = record_from_daemon(hello, status, port=port, address=host, source="static",
                                        software=getattr(status, "software", "") or "")
        except (PeerError, DiscoveryError) as exc:
            if key not in self._down:
                log.warning("static peer %s:%d does not answer: %s", host, port, exc)
                self._down.add(key)
            node = self._node_of.pop(key, None)
            if node is not None:
                self.table.remove(node)
            return
        if key in self._down:
            log.info("static peer %s:%d answers again", host, port)
            self._down.discard(key)
        old = self._node_of.get(key)
        if old is not None and old != record.node:
            self.table.remove(old)
        self._node_of[key] = record.node
        self.table.put(record)
