"""A running daemon's mDNS announcement, kept current beside the server (never in its request path).

`DaemonAnnouncer` reads the daemon's own HELLO and STATUS answers (the `ModelHost`
methods, no socket) into a `PeerRecord`, registers it, and then checks it every
`check_s`: a change of plan, epoch or state is published at once, memory figures at
most every `refresh_s`. `stop()` withdraws the service, so browsers see the daemon go.

Where to announce: the interfaces named, or else where the daemon listens: a daemon
on loopback (the default `--host 127.0.0.1`) announces on loopback only, since nobody
elsewhere could connect to it; one on 0.0.0.0 announces on every interface.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from .. import __version__
from ..discovery.address import WILDCARDS, resolve_ipv4
from ..discovery.mdns import Announcer, local_ipv4_addresses
from ..discovery.record import PeerRecord, record_from_daemon
from .protocol import HelloRequest

log = logging.getLogger(__name__)

# Fields whose change is published at once; memory figures wait for the next refresh.
_URGENT = ("blocks", "epoch", "state", "n_blocks", "port", "name")


def announce_plan(bind_host: str, interfaces: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """(interfaces to multicast on (None: all), addresses to announce) for a daemon bound to `bind_host`
    (an IPv4 address, a wildcard, 'localhost', an interface name or a host name; DiscoveryError if none)."""
    bind_host = resolve_ipv4(bind_host)
    wildcard = bind_host in WILDCARDS
    if interfaces:
        addresses = list(interfaces) if wildcard else [bind_host]
        return list(interfaces), addresses
    if _loopback(bind_host):
        return ["127.0.0.1"], ["127.0.0.1"]
    if wildcard:
        return None, local_ipv4_addresses()
    return [bind_host], [bind_host]


def _loopback(address: str) -> bool:
    try:
        return ipaddress.IPv4Address(address).is_loopback
    except ValueError:
        return False


class DaemonAnnouncer:
    def __init__(self, server, interfaces: list[str] | None = None, refresh_s: float = 5.0, check_s: float = 0.5):
        """`server`: a started DaemonServer; `interfaces`: IPv4 addresses to announce on (see module doc);
        `refresh_s`: the most often memory figures are republished; `check_s`: how often the plan is checked."""
        self.server = server
        self.interfaces, self.addresses = announce_plan(server.settings.bind_host, interfaces)
        if any(_loopback(a) for a in self.addresses) and any(not _loopback(i) for i in self.interfaces or []):
            log.warning("announcing %s on %s, but the daemon listens on loopback only: other machines cannot "
                        "connect; start it with --host 0.0.0.0 (or the interface's address)",
                        self.addresses, self.interfaces)
        self.refresh_s = refresh_s
        self.check_s = check_s
        self.announcer = Announcer(self.interfaces)
        self.published: PeerRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> PeerRecord:
        host = self.server.host
        hello = host.hello(HelloRequest(client="announce")).body
        return record_from_daemon(hello, host.status(), port=self.server.port, software=__version__, source="mdns")

    def start(self) -> "DaemonAnnouncer":
        """Announce in the background (registration probes the name for about 1.7 s)."""
        self.announcer.open()
        self._thread = threading.Thread(target=self._loop, name="comfy-mesh-announce", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.announcer.close()
        except Exception:  # shutting down: a failed goodbye only delays the peer's removal to its TTL
            log.warning("could not withdraw the mDNS announcement", exc_info=True)

    def _loop(self) -> None:
        last_publish = 0.0
        while not self._stop.is_set():
            try:
                record = self.record()
                urgent = self.published is None or any(
                    getattr(record, f) != getattr(self.published, f) for f in _URGENT)
                due = time.monotonic() - last_publish >= self.refresh_s and record != self.published
                if urgent or due:
                    self.announcer.publish(record, self.addresses)
                    self.published = record
                    last_publish = time.monotonic()
            except Exception:  # keep the daemon serving even if announcing breaks
                log.exception("mDNS announce failed; retrying in %.0f s", self.refresh_s)
                if self._stop.wait(self.refresh_s):
                    break
            self._stop.wait(self.check_s)
