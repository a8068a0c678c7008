"""mDNS (zeroconf): a daemon announces `_comfy-mesh._tcp.local.`; browsers keep a peer table.

`Announcer` registers one service whose TXT record is a `PeerRecord`, updates it in
place, and withdraws it (goodbye packets) on close. `MdnsBrowser` is a `PeerSource`:
every service of the type is resolved and validated; a record that is malformed, of a
newer major version or not from a comfy-mesh daemon is logged once and skipped.

Interfaces: None means every interface; tests and single-machine setups pass
`["127.0.0.1"]` (zeroconf works on loopback even without the MULTICAST flag on `lo`).
Only IPv4 is used: the daemon's ZeroMQ endpoint is an IPv4 address.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading

from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from .base import PeerSource
from .record import SERVICE_TYPE, DiscoveryError, PeerRecord

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000  # how long a browser waits for a service's SRV/TXT/A records
RECORD_TTL_S = 120  # a daemon that dies without saying goodbye (SIGKILL, power) leaves browsers within this
LIVENESS_S = 5.0  # how often a browser checks that its peers' records are still alive
_LABEL_MAX = 63  # bytes in one DNS label


def make_zeroconf(interfaces: list[str] | None) -> Zeroconf:
    """A Zeroconf instance on the given IPv4 interface addresses (None: all of them)."""
    try:
        return Zeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
                        ip_version=IPVersion.V4Only)
    except (OSError, ValueError) as exc:  # ValueError: not an IPv4 address (an interface name, 'localhost')
        raise DiscoveryError(f"cannot open mDNS on {interfaces or 'all interfaces'}: {exc}; check the address "
                             "(--interface / --announce-interface) or turn discovery off") from None


def local_ipv4_addresses(include_loopback: bool = False) -> list[str]:
    """This machine's IPv4 addresses (for announcing a daemon that listens on 0.0.0.0)."""
    import ifaddr  # a zeroconf dependency

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (include_loopback or not ip.ip.startswith("127.")):
                found.append(ip.ip)
    return sorted(set(found)) or ["127.0.0.1"]


def instance_name(record: PeerRecord) -> str:
    """`<name> [<node>]._comfy-mesh._tcp.local.`, the instance label within 63 bytes."""
    suffix = f" [{record.node}]"
    name = re.sub(r"[.\x00-\x1f]", "-", record.name)
    room = _LABEL_MAX - len(suffix.encode())
    label = name.encode()[:max(room, 0)].decode(errors="ignore") + suffix
    return f"{label}.{SERVICE_TYPE}"


def _host_name(node: str) -> str:
    label = re.sub(r"[^a-z0-9-]", "-", f"comfy-mesh-{node}".lower())[:_LABEL_MAX].strip("-")
    return f"{label}.local."


class Announcer:
    """One daemon's mDNS service: publish (register, then update in place) and withdraw."""

    def __init__(self, interfaces: list[str] | None = None, ttl_s: int = RECORD_TTL_S):
        """`ttl_s`: lifetime of the records in browsers' caches; browsers refresh live ones before it ends."""
        self.interfaces = interfaces
        self.ttl_s = ttl_s
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._lock = threading.Lock()

    def open(self) -> "Announcer":
        """Open the mDNS sockets now (a bad interface address fails here, with advice)."""
        with self._lock:
            if self._zc is None:
                self._zc = make_zeroconf(self.interfaces)
        return self

    def publish(self, record: PeerRecord, addresses: list[str]) -> None:
        """Register the record (about 1.7 s: mDNS probes the name first) or update it."""
        self.open()
        with self._lock:
            name = self._info.name if self._info is not None else instance_name(record)
            info = ServiceInfo(SERVICE_TYPE, name, port=record.port, properties=record.to_txt(),
                               server=_host_name(record.node), addresses=[socket.inet_aton(a) for a in addresses],
                               host_ttl=self.ttl_s, other_ttl=self.ttl_s)
            if self._info is None:
                self._zc.register_service(info, allow_name_change=True)
                log.info("announced %s on %s at %s:%d", info.name, self.interfaces or "all interfaces",
                         ",".join(addresses), record.port)
            else:
                self._zc.update_service(info)
            self._info = info

    def withdraw(self) -> None:
        with self._lock:
            if self._zc is not None and self._info is not None:
                self._zc.unregister_service(self._info)
                log.info("withdrew %s", self._info.name)
            self._info = None

    def close(self) -> None:
        self.withdraw()
        with self._lock:
            if self._zc is not None:
                self._zc.close()
                self._zc = None


class MdnsBrowser(PeerSource):
    """Live table of the comfy-mesh daemons that mDNS finds on `interfaces`."""

    def __init__(self, interfaces: list[str] | None = None, service_type: str = SERVICE_TYPE,
                 resolve_timeout_ms: int = RESOLVE_TIMEOUT_MS, liveness_s: float = LIVENESS_S):
        """`liveness_s`: how often peers' records are checked for having expired (a daemon that died
        without a goodbye); zeroconf itself would keep such a peer listed until its PTR record expires."""
        super().__init__()
        self.interfaces = interfaces
        self.service_type = service_type
        self.resolve_timeout_ms = resolve_timeout_ms
        self.liveness_s = liveness_s
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._lock = threading.Lock()  # guards _nodes and _skipped (zeroconf's thread and the watcher)
        self._nodes: dict[str, str] = {}  # service name -> node id
        self._skipped: dict[str, str] = {}  # service name -> why it was skipped (logged once)
        self._networks = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> "MdnsBrowser":
        if self._zc is None:
            self._zc = make_zeroconf(self.interfaces)
            self._networks = _local_networks(self.interfaces)
            self._stop.clear()
            self._browser = ServiceBrowser(self._zc, self.service_type, handlers=[self._on_change])
            self._watcher = threading.Thread(target=self._watch, name="comfy-mesh-mdns-liveness", daemon=True)
            self._watcher.start()
            log.debug("browsing %s on %s", self.service_type, self.interfaces or "all interfaces")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(self.resolve_timeout_ms / 1000 + 2)
            self._watcher = None
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None

    # ---------------------------------------------------------------- zeroconf's thread

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            else:
                self._resolve(zeroconf, service_type, name)
        except Exception:  # nothing a peer sends may stop the browser
            log.exception("mDNS browser: ignoring %s after an error", name)

    def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = zeroconf.get_service_info(service_type, name, timeout=self.resolve_timeout_ms)
        if info is None:
            log.debug("%s did not resolve within %d ms", name, self.resolve_timeout_ms)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        try:
            if not addresses:
                raise DiscoveryError("announces no IPv4 address")
            record = PeerRecord.from_txt(info.properties or {}, address=self._best_address(addresses),
                                         port=info.port, source="mdns")
        except ValueError as exc:  # DiscoveryError, or a value the checks missed: skip it and forget the old record
            with self._lock:
                new_reason = self._skipped.get(name) != str(exc)
                self._skipped[name] = str(exc)
            if new_reason:
                log.warning("skipping mDNS service %r: %s", name, exc)
            self._forget(name)
            return
        with self._lock:
            self._skipped.pop(name, None)
            old = self._nodes.get(name)
            self._nodes[name] = record.node
            orphan = old if old is not None and old != record.node and old not in self._nodes.values() else None
        if orphan is not None:
            self.table.remove(orphan)
        self.table.put(record)

    def _forget(self, name: str) -> None:
        with self._lock:
            node = self._nodes.pop(name, None)
            orphan = node if node is not None and node not in self._nodes.values() else None
        if orphan is not None:
            self.table.remove(orphan)

    # ---------------------------------------------------------------- the liveness thread

    def _watch(self) -> None:
        """Drop peers whose SRV/TXT/A records expired and that do not answer one more query."""
        while not self._stop.wait(self.liveness_s):
            with self._lock:
                names = list(self._nodes)
            for name in names:
                zc = self._zc
                if self._stop.is_set() or zc is None:
                    return
                try:
                    if ServiceInfo(self.service_type, name).load_from_cache(zc):
                        continue
                    if zc.get_service_info(self.service_type, name, timeout=self.resolve_timeout_ms) is None:
                        log.info("%s stopped answering without a goodbye; dropping it", name)
                        self._forget(name)
                except Exception:  # the liveness check must not end; the next round tries again
                    log.exception("mDNS liveness check of %s failed", name)

    def _best_address(self, addresses: list[str]) -> str:
        """Of the daemon's addresses, one on a network this machine is on (else the first)."""
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if any(ip in net for net in self._networks):
                return address
        return addresses[0]


def _local_networks(interfaces: list[str] | None) -> list:
    """IPv4 networks of this machine's interfaces (only those named, if any are)."""
    import ifaddr

    nets = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (not interfaces or ip.ip in interfaces):
                try:
                    nets.append(ipaddress.ip_network(f"{ip.ip}/{ip.network_prefix}", strict=False))
                except ValueError:
                    continue
    return nets
