"""Which daemon the node talks to: the peer dropdown, manual addresses, the codec choice.

The dropdown lists the daemons that discovery (`comfy_mesh.discovery`, mDNS) sees, as
`name (host:port)`, after a first entry that means "use the address typed below".
Discovery starts on first use, never at ComfyUI start-up, and its absence or failure
only leaves the manual address. Environment knobs, read when discovery starts:

- `COMFY_MESH_DISCOVERY=0`: no mDNS browsing (manual addresses only);
- `COMFY_MESH_INTERFACES=192.168.1.10,127.0.0.1`: browse on these interfaces only;
- `COMFY_MESH_PEERS=10.8.0.2:5599,...`: static peers (polled over the protocol) as well.

Import-light: no torch, no zmq, no zeroconf until discovery starts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time

from .errors import MeshError

log = logging.getLogger(__name__)

MANUAL = "manual address"  # the dropdown entry that means "use the address field"
DEFAULT_PORT = 5599  # the daemon's default --port
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
FIRST_BROWSE_WAIT_S = 1.5  # how long the first dropdown fill waits for mDNS answers (s)

_LABEL_RE = re.compile(r"\(([^()\s]+)\)\s*$")


# ------------------------------------------------------------------ addresses


def parse_address(text: str) -> tuple[str, int]:
    """`host:port`, `tcp://host:port`, `[v6]:port` or a bare host (default port) -> (host, port)."""
    spec = (text or "").strip()
    spec = spec.removeprefix("tcp://")
    if not spec:
        raise MeshError("comfy-mesh: no peer address: pick a discovered peer or type HOST:PORT "
                        f"(for a daemon on this machine: {DEFAULT_ADDRESS})")
    host, port = spec, str(DEFAULT_PORT)
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise MeshError(f"comfy-mesh: bad peer address {text!r}: an IPv6 address goes in brackets, [::1]:5599")
        host, rest = spec[1:end], spec[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise MeshError(f"comfy-mesh: bad peer address {text!r}; write HOST:PORT")
            port = rest[1:]
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    elif spec.count(":") > 1:
        raise MeshError(f"comfy-mesh: bad peer address {text!r}: put an IPv6 address in brackets, [::1]:5599")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError(f"comfy-mesh: bad peer address {text!r}; write HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host, int(port)


def endpoint_of(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def label(record) -> str:
    """The dropdown entry of a discovered peer: `name (host:port)`."""
    host = getattr(record, "address", None) or "127.0.0.1"
    hostport = f"[{host}]:{record.port}" if ":" in host else f"{host}:{record.port}"
    return f"{record.name} ({hostport})"


def resolve_peer(peer: str, address: str) -> tuple[str, str, str]:
    """(display name, host, endpoint) for the node's `peer` and `address` inputs."""
    if not peer or peer == MANUAL:
        host, port = parse_address(address)
        return f"{host}:{port}", host, endpoint_of(host, port)
    match = _LABEL_RE.search(peer)
    if match is None:  # a saved workflow may hold a bare address in the dropdown
        host, port = parse_address(peer)
        return f"{host}:{port}", host, endpoint_of(host, port)
    host, port = parse_address(match.group(1))
    return peer, host, endpoint_of(host, port)


# ------------------------------------------------------------------ discovery


class _Discovery:
    """The one peer source of this ComfyUI process, started on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._source = None
        self._started = False
        self.error: str | None = None

    def set_source(self, source) -> None:
        """Use `source` (anything with start/stop/peers); tests pass a fake, None resets."""
        with self._lock:
            if self._source is not None and self._started:
                _safe_stop(self._source)
            self._source, self._started, self.error = source, source is not None, None
            if source is not None:
                source.start()

    def peers(self) -> list:
        with self._lock:
            if not self._started:
                self._started = True
                self._source = self._start()
                if self._source is not None:
                    deadline = time.monotonic() + FIRST_BROWSE_WAIT_S
                    while not self._source.peers() and time.monotonic() < deadline:
                        time.sleep(0.05)
            source = self._source
        if source is None:
            return []
        try:
            return list(source.peers())
        except Exception as exc:  # discovery must never break the node
            log.warning("comfy-mesh: peer discovery failed: %s", exc)
            return []

    def _start(self):
        if os.environ.get("COMFY_MESH_DISCOVERY", "1").strip().lower() in ("0", "off", "no", "false"):
            self.error = "discovery is off (COMFY_MESH_DISCOVERY=0)"
            return None
        interfaces = [s.strip() for s in os.environ.get("COMFY_MESH_INTERFACES", "").split(",") if s.strip()] or None
        static = [s.strip() for s in os.environ.get("COMFY_MESH_PEERS", "").split(",") if s.strip()] or None
        try:
            from ..discovery import peer_source
        except ImportError as exc:
            self.error = f"discovery is not available in this install ({exc}); use manual addresses"
            log.info("comfy-mesh: %s", self.error)
            return None
        try:
            return peer_source(interfaces=interfaces, static=static).start()
        except Exception as exc:
            self.error = f"discovery could not start: {exc}; use manual addresses"
            log.warning("comfy-mesh: %s", self.error)
            return None

    def stop(self) -> None:
        with self._lock:
            if self._source is not None:
                _safe_stop(self._source)
            self._source, self._started = None, False


def _safe_stop(source) -> None:
    try:
        source.stop()
    except Exception:
        log.debug("stopping peer discovery failed", exc_info=True)


DISCOVERY = _Discovery()


def peer_choices() -> list[str]:
    """The peer dropdown: the manual entry, then every discovered daemon."""
    return [MANUAL] + sorted({label(r) for r in DISCOVERY.peers()})


def peers_json() -> list[dict]:
    """Discovered peers for `/comfy-mesh/status`."""
    out = []
    for record in DISCOVERY.peers():
        to_json = getattr(record, "to_json", None)
        entry = dict(to_json()) if callable(to_json) else {"name": record.name, "port": record.port}
        entry["label"] = label(record)
        out.append(entry)
    return out


# ------------------------------------------------------------------ codecs

AUTO = "auto"


def codec_choices() -> list[str]:
    """`auto` and every codec this install has (imports the codec registry, hence torch)."""
    from .. import codec as codecs

    return [AUTO] + [c for c in codecs.available()]


def choose_codec(requested: str, host: str, cuda: bool) -> str:
    """`auto`: raw on loopback (nothing to gain from compressing), else the best lossy codec here."""
    from .. import codec as codecs

    available = codecs.available()
    if requested != AUTO:
        if requested not in available:
            raise MeshError(f"comfy-mesh: codec {requested!r} is not available in this install; choose one of "
                            f"{', '.join([AUTO] + available)}")
        return requested
    if is_loopback(host):
        return "raw"
    for name in (["nvenc", "gpu"] if cuda else []) + ["cpu"]:
        if name in available:
            return name
    return "raw"
