"""The peer record: what a daemon announces about itself, one versioned dataclass.

mDNS carries it as the TXT record of a `_comfy-mesh._tcp.local.` service; static peers
build the same record from a daemon's HELLO and STATUS replies. `to_txt` writes short
keys with string values; `from_txt` validates every key it knows and ignores the ones
it does not, so an older reader and a newer writer (or the reverse) understand each
other as long as the major version matches:

    app=comfy-mesh  v=1.0  id=node-3f2a  name=studio-pc  proto=1  sw=0.1.0
    gpu=NVIDIA GeForce RTX 3080  mk=cuda  vt=10737418240  vf=8589934592
    enc=cpu,raw  dec=cpu,raw  model=flux2-klein-9b.safetensors  mfp=3fa1...  nb=32
    blocks=16-32  epoch=4  state=serving  port=5599  kfp=

A record from a newer major version, from something that is not a comfy-mesh daemon,
or with a malformed field raises `DiscoveryError`; browsers log it and skip the peer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

SERVICE_TYPE = "_comfy-mesh._tcp.local."
APP = "comfy-mesh"
RECORD_MAJOR = 1  # readers refuse records of a newer major version
RECORD_MINOR = 0  # bumped for added optional keys; readers of any minor ignore unknown keys
MEMORY_KINDS = ("cuda", "process")  # VRAM of a GPU, or a CPU-only node's process memory (RSS) and RAM

_TXT_VALUE_MAX = 200  # bytes; a TXT string holds 255 including "key="
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # fullmatch: no trailing newline slips through


class DiscoveryError(ValueError):
    """A peer record or a peer address that cannot be used; the message says why."""


@dataclass
class PeerRecord:
    """One daemon as discovery sees it. Sizes in bytes; `blocks` is half-open [start, end)."""

    node: str  # node id: the name plans give this daemon
    name: str  # human-readable
    port: int  # the daemon's ZeroMQ ROUTER port
    n_blocks: int  # blocks of the model it serves (the slider's range)
    blocks: tuple[int, int] | None = None  # hosted [start, end) under its current plan, None if none
    epoch: int = 0  # its current plan epoch
    state: str = "serving"  # "serving", "loading", "idle"
    model: str | None = None  # checkpoint file name
    model_fingerprint: str | None = None  # first 16 hex digits of the model fingerprint
    gpus: list[str] = field(default_factory=list)  # GPU name(s); empty on a CPU-only node
    memory_kind: str = "process"  # "cuda": vram_* are the card's; "process": RSS and RAM of a CPU node
    vram_total: int = 0  # bytes
    vram_free: int = 0  # bytes
    encode: list[str] = field(default_factory=list)  # codecs it can encode (its replies)
    decode: list[str] = field(default_factory=list)  # codecs it can decode (requests)
    proto: int = 1  # daemon wire protocol version
    software: str = ""  # comfy-mesh version
    key_fingerprint: str | None = None  # fingerprint of the node's public key, once keys exist
    version: str = f"{RECORD_MAJOR}.{RECORD_MINOR}"  # record format version
    # Not in the TXT record: where the browser saw it, and how.
    address: str | None = None  # IPv4 address to connect to
    source: str = "mdns"  # "mdns" or "static"

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint of the daemon."""
        host = self.address or "127.0.0.1"
        return f"tcp://[{host}]:{self.port}" if ":" in host else f"tcp://{host}:{self.port}"

    @property
    def vram_used(self) -> int:
        return max(0, self.vram_total - self.vram_free)

    @property
    def codecs(self) -> list[str]:
        """Codecs usable in both directions with this daemon."""
        return sorted(set(self.encode) & set(self.decode)) or sorted(set(self.encode) | set(self.decode))

    def replace(self, **changes) -> "PeerRecord":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- TXT

    def to_txt(self) -> dict[str, str]:
        """The TXT record: short keys, string values, each within one TXT string."""
        txt = {
            "app": APP, "v": f"{RECORD_MAJOR}.{RECORD_MINOR}", "id": self.node, "name": _clip(self.name),
            "proto": str(self.proto), "sw": _clip(self.software), "gpu": _clip(",".join(self.gpus)),
            "mk": self.memory_kind, "vt": str(self.vram_total), "vf": str(self.vram_free),
            "enc": _clip(",".join(self.encode)), "dec": _clip(",".join(self.decode)),
            "model": _clip(self.model or ""), "mfp": self.model_fingerprint or "", "nb": str(self.n_blocks),
            "blocks": f"{self.blocks[0]}-{self.blocks[1]}" if self.blocks else "", "epoch": str(self.epoch),
            "state": _clip(self.state), "port": str(self.port), "kfp": _clip(self.key_fingerprint or ""),
        }
        return txt

    @classmethod
    def from_txt(cls, properties: dict, *, address: str | None = None, port: int | None = None,
                 source: str = "mdns") -> "PeerRecord":
        """Validate a TXT record (keys and values as bytes or str). `port` (the SRV record's) wins
        over the TXT one. Raises DiscoveryError for anything that is not a usable comfy-mesh record."""
        txt = _decode_txt(properties)
        app = txt.get("app")
        if app != APP:
            raise DiscoveryError(f"not a comfy-mesh daemon (app={app!r})")
        major, minor = _version(txt.get("v"))
        if major > RECORD_MAJOR:
            raise DiscoveryError(f"peer record version {major}.{minor} is newer than this build reads "
                                 f"({RECORD_MAJOR}.x); upgrade comfy-mesh on this machine to see that peer")
        node = _required(txt, "id")
        if not _NODE_RE.fullmatch(node):
            raise DiscoveryError(f"node id {node!r} is not a valid node id")
        n_blocks = _int(txt, "nb")
        blocks = _range(txt.get("blocks", ""), n_blocks)
        memory_kind = txt.get("mk", "process")
        if memory_kind not in MEMORY_KINDS:
            raise DiscoveryError(f"memory kind {memory_kind!r} is none of {MEMORY_KINDS}")
        vram_total, vram_free = _int(txt, "vt", 0), _int(txt, "vf", 0)
        if vram_free > vram_total:
            raise DiscoveryError(f"free memory {vram_free} exceeds the total {vram_total}")
        txt_port = _int(txt, "port", 0)
        port = txt_port if port is None else port
        if not 0 < port < 65536:
            raise DiscoveryError(f"port {port} is not a TCP port")
        return cls(
            node=node, name=txt.get("name") or node, port=port, n_blocks=n_blocks, blocks=blocks,
            epoch=_int(txt, "epoch", 0), state=txt.get("state") or "serving", model=txt.get("model") or None,
            model_fingerprint=txt.get("mfp") or None, gpus=_list(txt.get("gpu", "")), memory_kind=memory_kind,
            vram_total=vram_total, vram_free=vram_free, encode=_list(txt.get("enc", "")),
            decode=_list(txt.get("dec", "")), proto=_int(txt, "proto", 1), software=txt.get("sw", ""),
            key_fingerprint=txt.get("kfp") or None, version=f"{major}.{minor}", address=address, source=source)

    # ---------------------------------------------------------------- JSON (comfy-mesh peers --json)

    def to_json(self) -> dict:
        return {
            "name": self.name, "node": self.node, "address": self.address, "port": self.port,
            "endpoint": self.endpoint, "gpu": ", ".join(self.gpus) if self.gpus else None, "gpus": self.gpus,
            "memory_kind": self.memory_kind, "vram_total": self.vram_total, "vram_free": self.vram_free,
            "codecs": self.codecs, "encode": self.encode, "decode": self.decode, "model": self.model,
            "model_fingerprint": self.model_fingerprint, "n_blocks": self.n_blocks,
            "blocks": list(self.blocks) if self.blocks else None, "epoch": self.epoch, "state": self.state,
            "version": self.software, "proto": self.proto, "record_version": self.version,
            "key_fingerprint": self.key_fingerprint, "source": self.source,
        }


def record_from_daemon(hello, status, *, port: int, address: str | None = None, software: str = "",
                       source: str = "static") -> PeerRecord:
    """A record from a daemon's HelloReply and StatusReply (duck-typed: any objects with their fields)."""
    mem = status.memory or {}
    kind = mem.get("kind") if mem.get("kind") in MEMORY_KINDS else "process"
    total, used = int(mem.get("total") or 0), int(mem.get("used") or 0)
    gpus = [mem["gpu"]] if kind == "cuda" and mem.get("gpu") else []
    model = status.model or hello.model
    return PeerRecord(
        node=hello.node, name=hello.name, port=port, n_blocks=hello.n_blocks,
        blocks=tuple(status.hosted) if status.hosted else None, epoch=status.epoch, state=status.state,
        model=_model_name(model), model_fingerprint=(hello.fingerprint or "")[:16] or None, gpus=gpus,
        memory_kind=kind, vram_total=total, vram_free=max(0, total - used),
        encode=list(getattr(hello, "encoders", None) or status.codecs),  # HELLO says where the two differ
        decode=list(getattr(hello, "decoders", None) or hello.codecs), proto=hello.proto, software=software,
        address=address, source=source)


def _model_name(spec: str | None) -> str | None:
    if not spec:
        return None
    return spec.rstrip("/").rsplit("/", 1)[-1]


# ------------------------------------------------------------------ validation helpers


def _clip(value: str) -> str:
    """Cut a free-text value to fit one TXT string, on a UTF-8 character boundary."""
    data = value.encode()
    if len(data) <= _TXT_VALUE_MAX:
        return value
    return data[:_TXT_VALUE_MAX].decode(errors="ignore")


def _decode_txt(properties) -> dict[str, str]:
    if not isinstance(properties, dict):
        raise DiscoveryError("TXT record is not a key/value table")
    out = {}
    for key, value in properties.items():
        try:
            k = key.decode() if isinstance(key, bytes) else str(key)
            v = "" if value is None else value.decode() if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise DiscoveryError(f"TXT entry {key!r} is not UTF-8") from None
        out[k.lower()] = v
    return out


def _version(value) -> tuple[int, int]:
    if not value:
        raise DiscoveryError("record has no version ('v')")
    m = re.fullmatch(r"([0-9]{1,4})\.([0-9]{1,4})", value)
    if m is None:
        raise DiscoveryError(f"record version {value!r} is not MAJOR.MINOR")
    major, minor = int(m.group(1)), int(m.group(2))
    if major < 1:
        raise DiscoveryError(f"record version {value!r} predates 1.0")
    return major, minor


def _required(txt: dict, key: str) -> str:
    value = txt.get(key)
    if not value:
        raise DiscoveryError(f"record lacks {key!r}")
    return value


def _int(txt: dict, key: str, default: int | None = None) -> int:
    value = txt.get(key)
    if value is None or value == "":
        if default is None:
            raise DiscoveryError(f"record lacks {key!r}")
        return default
    if not is_decimal(value) or len(value) > 20:
        raise DiscoveryError(f"{key}={value!r} is not a non-negative integer")
    return int(value)


def is_decimal(text: str) -> bool:
    """ASCII digits only ('²' and other Unicode digits are not, though str.isdigit() says they are)."""
    return text.isascii() and text.isdecimal()


def _range(value: str, n_blocks: int) -> tuple[int, int] | None:
    if not value:
        return None
    m = re.fullmatch(r"([0-9]{1,6})-([0-9]{1,6})", value)
    if m is None:
        raise DiscoveryError(f"blocks={value!r} is not START-END")
    start, end = int(m.group(1)), int(m.group(2))
    if not 0 <= start <= end <= n_blocks:
        raise DiscoveryError(f"blocks [{start}, {end}) do not fit a model of {n_blocks} blocks")
    return start, end


def _list(value: str) -> list[str]:
    return [item for item in (s.strip() for s in value.split(",")) if item]
