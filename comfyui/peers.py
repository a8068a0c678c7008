"""Which daemon the node talks to: the peer dropdown, manual addresses, the codec choice.

The dropdown lists the daemons that discovery (`comfy_mesh.discovery`, mDNS) sees, as
`name (host:port)`, after a first entry that means "use the address typed below".
Discovery starts on first use, never at ComfyUI start-up, in a background thread: the
dropdown (built inside ComfyUI's web server) lists what has been found so far and never
waits. Its absence or failure only leaves the manual address. Environment knobs, read when
discovery starts:

- `COMFY_MESH_DISCOVERY=0`: no mDNS browsing (manual addresses only);
- `COMFY_MESH_INTERFACES=192.168.1.10,127.0.0.1`: browse on these interfaces only;
- `COMFY_MESH_PEERS=10.8.0.2:5599,...`: static peers (polled over the protocol) as well.

Import-light: no torch, no zmq, no zeroconf until discovery starts (and the codec list,
which imports torch, is probed in the background too).
"""

from __future__ import annotations

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
FIRST_BROWSE_WAIT_S = 1.5  # how long the status route (never the dropdown) waits for first mDNS answers (s)

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
    """The one peer source of this ComfyUI process, started on first use in a background thread.

    `peers()` never blocks on the network unless asked to wait: ComfyUI builds the node's
    inputs (`INPUT_TYPES`) inside its async `/object_info` handler, where a sleep would
    stall the whole web server. The first call starts discovery and returns what is known
    (nothing yet); later calls list what has been found since.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._source = None
        self._started = False
        self._ready = threading.Event()  # set once the source is up (or failed to start)
        self._generation = 0  # bumped by set_source/stop, so a late start cannot resurrect a stopped source
        self.error: str | None = None

    def set_source(self, source) -> None:
        """Use `source` (anything with start/stop/peers); tests pass a fake, None resets."""
        with self._lock:
            self._generation += 1
            if self._source is not None and self._started:
                _safe_stop(self._source)
            self._source, self._started, self.error = source, source is not None, None
            self._ready = threading.Event()
            if source is not None:
                source.start()
                self._ready.set()

    def peers(self, wait_s: float = 0.0) -> list:
        """The daemons found so far. `wait_s` > 0 (off the event loop only): while discovery
        is still starting, wait up to that long for it and for its first answers."""
        with self._lock:
            if not self._started:
                self._started = True
                self._ready = threading.Event()
                if not self._configure():
                    self._ready.set()
                else:
                    threading.Thread(target=self._start, args=(self._generation, self._ready), daemon=True,
                                     name="comfy-mesh discovery start").start()
            source, ready = self._source, self._ready
        if wait_s > 0 and source is None:
            deadline = time.monotonic() + wait_s
            ready.wait(wait_s)
            with self._lock:
                source = self._source
            while source is not None and not _listed(source) and time.monotonic() < deadline:
                time.sleep(0.05)
        return _listed(source)

    def _configure(self) -> bool:
        """Cheap checks, done at once: False when discovery is off."""
        if os.environ.get("COMFY_MESH_DISCOVERY", "1").strip().lower() in ("0", "off", "no", "false"):
            self.error = "discovery is off (COMFY_MESH_DISCOVERY=0)"
            return False
        return True

    def _start(self, generation: int, ready: threading.Event) -> None:
        """In the background thread: import discovery (zeroconf), start browsing."""
        interfaces = [s.strip() for s in os.environ.get("COMFY_MESH_INTERFACES", "").split(",") if s.strip()] or None
        static = [s.strip() for s in os.environ.get("COMFY_MESH_PEERS", "").split(",") if s.strip()] or None
        source, error = None, None
        try:
            from ..discovery import peer_source
        except ImportError as exc:
            error = f"discovery is not available in this install ({exc}); use manual addresses"
            log.info("comfy-mesh: %s", error)
        else:
            try:
                source = peer_source(interfaces=interfaces, static=static).start()
            except Exception as exc:
                error = f"discovery could not start: {exc}; use manual addresses"
                log.warning("comfy-mesh: %s", error)
        with self._lock:
            current = generation == self._generation
            if current:
                self._source, self.error = source, error
        if not current and source is not None:  # stopped or replaced meanwhile
            _safe_stop(source)
        ready.set()

    def stop(self) -> None:
        with self._lock:
            self._generation += 1
            if self._source is not None:
                _safe_stop(self._source)
            self._source, self._started = None, False


def _listed(source) -> list:
    if source is None:
        return []
    try:
        return list(source.peers())
    except Exception as exc:  # discovery must never break the node
        log.warning("comfy-mesh: peer discovery failed: %s", exc)
        return []


def _safe_stop(source) -> None:
    try:
        source.stop()
    except Exception:
        log.debug("stopping peer discovery failed", exc_info=True)


DISCOVERY = _Discovery()


def peer_choices() -> list[str]:
    """The peer dropdown: the manual entry, then every discovered daemon."""
    return [MANUAL] + sorted({label(r) for r in DISCOVERY.peers()})


def peers_json(wait_s: float = 0.0) -> list[dict]:
    """Discovered peers for `/comfy-mesh/status` (`wait_s`: see `_Discovery.peers`)."""
    out = []
    for record in DISCOVERY.peers(wait_s):
        to_json = getattr(record, "to_json", None)
        entry = dict(to_json()) if callable(to_json) else {"name": record.name, "port": record.port}
        entry["label"] = label(record)
        out.append(entry)
    return out


# ------------------------------------------------------------------ codecs

AUTO = "auto"
# The registered codecs (codec/registry.py), listed before the probe has said which are
# usable here; the node refuses an unusable one by name when it runs.
KNOWN_CODECS = ("cpu", "gpu", "nvenc", "raw", "x265")


class _CodecProbe:
    """`codec.available()` (imports torch; probing NVENC opens a session, ~0.5 s), run once
    in a background thread so that building the node's inputs never waits for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.names: list[str] | None = None

    def available(self, wait_s: float = 0.0) -> list[str] | None:
        """The usable codecs, or None while the probe runs (`wait_s`: how long to wait for it)."""
        with self._lock:
            if self.names is None and self._thread is None:
                self._thread = threading.Thread(target=self._probe, daemon=True, name="comfy-mesh codec probe")
                self._thread.start()
            thread = self._thread
        if self.names is None and wait_s > 0 and thread is not None:
            thread.join(wait_s)
        return self.names

    def _probe(self) -> None:
        try:
            from .. import codec as codecs

            self.names = list(codecs.available())
        except Exception as exc:  # a broken optional codec must not break the node's list
            log.warning("comfy-mesh: probing codecs failed (%s); listing every registered codec", exc)
            self.names = list(KNOWN_CODECS)


CODECS = _CodecProbe()


def codec_choices() -> list[str]:
    """`auto` and the codecs this install has; every registered codec while the probe runs."""
    names = CODECS.available()
    return [AUTO] + (names if names is not None else list(KNOWN_CODECS))


def check_codec(requested: str) -> str:
    """`requested` if it is `auto` or a codec this install can encode, else a MeshError."""
    from .. import codec as codecs

    available = codecs.available()
    if requested != AUTO and requested not in available:
        raise MeshError(f"comfy-mesh: codec {requested!r} is not available in this install; choose one of "
                        f"{', '.join([AUTO] + available)}")
    return requested


def choose_codec(requested: str, endpoint: str, info, *, local_cuda: bool) -> tuple[str, str]:
    """(codec for the carry, why), once the peer's HELLO (`info`) is known.

    `auto` is `comfy_mesh.codec.negotiate.choose` from both ends' capabilities: raw on
    loopback, else the best codec this end encodes and the peer decodes (nvenc, gpu with
    CUDA here, cpu). Only the carry's choice is used: the node always takes the reply raw.
    """
    from ..codec.negotiate import choose_for_peer, format_mismatches

    if requested != AUTO:
        mismatched = format_mismatches(getattr(info, "formats", None))
        if requested in mismatched:
            raise MeshError(f"comfy-mesh: codec {requested!r} cannot be used with this peer: {mismatched[requested]}")
        return check_codec(requested), "chosen on the node"
    choice = choose_for_peer(endpoint, info, local_cuda=local_cuda)
    return choice.carry, choice.carry_reason  # the reply's half does not apply: it comes back raw
