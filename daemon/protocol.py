"""The wire protocol between a client (DEALER) and a daemon (ROUTER), version 1.

A message is a list of ZeroMQ frames: frame 0 is a UTF-8 JSON header, the rest are
raw buffers (no pickle, ever). The header names the message type, a request id the
reply echoes, a typed body, and the tensors the buffers belong to:

    {"proto": 1, "type": "FORWARD", "id": 7, "body": {...},
     "tensors": [{"name": "carry", "enc": {codec header}, "nbuf": 1}]}

Each body is a dataclass below; `from_frames` validates everything it reads and raises
`ProtocolError` with a code and a message that says what was wrong, so a daemon can
answer garbage with an ERROR reply and go on serving.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..codec.base import EncodedTensor

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a header is small JSON; anything bigger is garbage or abuse


class ErrorCode:
    """Codes of ERROR replies; the message beside each says what to do."""

    MALFORMED = "malformed"  # not a comfy-mesh message, or a field of the wrong type
    VERSION = "version"  # protocol version mismatch
    TOO_LARGE = "too_large"  # message over the daemon's max_message_bytes
    FINGERPRINT = "fingerprint"  # client and daemon hold different model files
    STALE_EPOCH = "stale_epoch"  # request made under an old plan; the reply carries the current one
    MISSING_CONTEXT = "missing_context"  # per-generation context (position ids) not cached: resend it
    NOT_HOSTING = "not_hosting"  # the daemon hosts no blocks under the current plan
    OOM = "out_of_memory"  # the daemon's GPU is full
    CODEC_STATE = "codec_state"  # a delta-coded carry does not fit the daemon's stream state: send a key message
    BAD_REQUEST = "bad_request"  # well-formed but inconsistent (shapes, unknown codec, ...)
    INTERNAL = "internal"  # a bug: the daemon logged a traceback and keeps serving


class ProtocolError(Exception):
    """A request that cannot be answered normally; becomes an ERROR reply.

    `plan` (a Plan dict) rides along with STALE_EPOCH so the client can adopt it.
    """

    def __init__(self, code: str, message: str, plan: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.plan = plan


# ------------------------------------------------------------------ bodies


@dataclass
class HelloRequest:
    client: str  # a name for logs
    proto: int = PROTOCOL_VERSION
    fingerprint: str | None = None  # the client's model fingerprint, checked if given
    codecs: list = field(default_factory=list)  # codecs the client can decode


@dataclass
class HelloReply:
    node: str  # node id: the name this daemon has in plans
    name: str  # human-readable node name
    proto: int
    model: str | None  # checkpoint spec the daemon serves
    fingerprint: str | None
    family: str | None  # "flux2"
    config: dict | None  # the model config (sizes) inferred from the checkpoint
    n_blocks: int
    hosted: list | None  # [start, end) under the current plan, None if none
    last: bool  # whether it runs the final layer
    epoch: int
    codecs: list
    device: str
    max_message_bytes: int
    # Optional (older peers omit them): what this node can encode and decode, where the two
    # differ (an H100 decodes NVENC's HEVC with NVDEC but cannot encode it). None: `codecs`.
    encoders: list | None = None
    decoders: list | None = None
    # Optional (older peers omit it): codec name -> message format version (registry.formats()).
    # A codec whose version differs between the two installs is not used between them.
    formats: dict | None = None


@dataclass
class ForwardRequest:
    epoch: int  # the plan epoch the client works under
    session: str  # one generation; context is cached per session
    step: int
    timestep: list  # per batch item, flow-matching sigma in [0, 1]
    ids_hash: str  # content hash of (txt_ids, img_ids); the tensors ride along once
    guidance: list | None = None
    reply_codec: str = "raw"  # codec for what comes back (model output or hidden state)
    reply_settings: dict = field(default_factory=dict)  # its settings, e.g. {"quality": 7}
    reply_reset: bool = False  # start the reply stream over (the client lost its delta state)
    codec_choice: dict | None = None  # {"codec", "reason"}: how the client chose its codec, for STATUS


@dataclass
class ForwardReply:
    step: int
    kind: str  # "output" (final layer ran here) or "hidden" (a later stage continues)
    decode_s: float
    compute_s: float
    encode_s: float


@dataclass
class ReconfigureRequest:
    plan: dict  # Plan.to_dict()


@dataclass
class ReconfigureReply:
    epoch: int
    hosted: list | None
    last: bool
    loaded_bytes: int
    seconds: float


@dataclass
class StatusRequest:
    pass


@dataclass
class StatusReply:
    node: str
    name: str
    state: str  # "serving", "loading", "idle" (hosting nothing)
    model: str | None
    hosted: list | None
    last: bool
    epoch: int
    device: str
    memory: dict  # {"kind": "cuda"|"process", "used": bytes, "total": bytes, "weights": bytes}
    requests: int  # requests answered, errors included
    errors: int
    forward_steps: int
    step_s: dict  # {"last": s, "mean": s} compute time of FORWARD
    bytes_in: int
    bytes_out: int
    uptime_s: float
    codecs: list
    # Optional (added after version 1 shipped; older peers omit them and still parse):
    raw_bytes: int = 0  # FORWARD tensors (carry in, result out) counted as bf16: the codec ratio's numerator
    wire_bytes: int = 0  # the same tensors as encoded on the wire: its denominator
    loading: dict | None = None  # {"done": bytes, "total": bytes} while blocks load, else None
    plan: dict | None = None  # the current plan (Plan.to_dict()), so a client can adopt it without a FORWARD
    software: str = ""  # the daemon's comfy-mesh version
    codec: dict | None = None  # the last client's codec choice and why: {"codec", "reason"}


@dataclass
class ErrorReply:
    code: str
    message: str
    plan: dict | None = None  # the current plan, with STALE_EPOCH


BODIES: dict[str, type] = {
    "HELLO": HelloRequest, "HELLO_OK": HelloReply,
    "FORWARD": ForwardRequest, "FORWARD_OK": ForwardReply,
    "RECONFIGURE": ReconfigureRequest, "RECONFIGURE_OK": ReconfigureReply,
    "STATUS": StatusRequest, "STATUS_OK": StatusReply,
    "ERROR": ErrorReply,
}
TYPE_OF = {cls: name for name, cls in BODIES.items()}


# ------------------------------------------------------------------ messages


@dataclass
class Message:
    body: Any  # one of the dataclasses above
    id: int = 0
    tensors: dict = field(default_factory=dict)  # name -> EncodedTensor

    @property
    def type(self) -> str:
        return TYPE_OF[type(self.body)]

    def to_frames(self) -> list:
        tensors, buffers = [], []
        for name, enc in self.tensors.items():
            tensors.append({"name": name, "enc": enc.header, "nbuf": len(enc.buffers)})
            buffers.extend(enc.buffers)
        header = {"proto": PROTOCOL_VERSION, "type": self.type, "id": self.id, "body": asdict(self.body),
                  "tensors": tensors}
        return [json.dumps(header, separators=(",", ":")).encode()] + buffers

    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.to_frames())


def _check_type(value, annotation) -> bool:
    """Does a JSON value fit a body field's annotation (int, float, str, bool, list, dict, X | None)?"""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        annotation = origin
    return isinstance(value, annotation)


def _body_from_dict(cls: type, data) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"{TYPE_OF[cls]} body must be an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(ErrorCode.MALFORMED, f"{TYPE_OF[cls]} lacks the field {f.name!r}")
            continue
        value = data[f.name]
        if not _check_type(value, hints[f.name]):
            raise ProtocolError(ErrorCode.MALFORMED,
                                f"{TYPE_OF[cls]}.{f.name} must be {hints[f.name]}, got {type(value).__name__}")
        values[f.name] = value
    # Unknown fields are ignored on purpose: a newer peer may add optional ones.
    return cls(**values)


def from_frames(frames: list, max_bytes: int | None = None) -> Message:
    """Parse and validate a received message (frames as bytes or zmq.Frame)."""
    raw = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    if not raw:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message")
    total = sum(m.nbytes for m in raw)
    if max_bytes is not None and total > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"message of {total} bytes exceeds this daemon's limit of {max_bytes} bytes; "
                            "use a compressing codec or raise --max-message-mb")
    if raw[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, f"header frame of {raw[0].nbytes} bytes is too large")
    try:
        header = json.loads(bytes(raw[0]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(ErrorCode.MALFORMED, "frame 0 is not a JSON header: not a comfy-mesh message?") from None
    if not isinstance(header, dict) or "type" not in header or "proto" not in header:
        raise ProtocolError(ErrorCode.MALFORMED, "header lacks 'proto' or 'type': not a comfy-mesh message?")
    if header["proto"] != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"peer speaks protocol {header['proto']!r}, this node speaks "
                                               f"{PROTOCOL_VERSION}; install the same comfy-mesh version on both")
    cls = BODIES.get(header["type"])
    if cls is None:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown message type {header['type']!r}")
    msg_id = header.get("id", 0)
    if not _check_type(msg_id, int):
        raise ProtocolError(ErrorCode.MALFORMED, "message id must be an integer")
    body = _body_from_dict(cls, header.get("body"))

    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError(ErrorCode.MALFORMED, "'tensors' must be a list")
    tensors, pos = {}, 1
    for spec in specs:
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("enc"), dict)
                and _check_type(spec.get("nbuf"), int) and spec["nbuf"] >= 0):
            raise ProtocolError(ErrorCode.MALFORMED, f"bad tensor entry {str(spec)[:200]}")
        buffers = raw[pos:pos + spec["nbuf"]]
        if len(buffers) != spec["nbuf"]:
            raise ProtocolError(ErrorCode.MALFORMED,
                                f"tensor {spec['name']!r} needs {spec['nbuf']} buffers, message is truncated")
        tensors[spec["name"]] = EncodedTensor(spec["enc"], list(buffers))
        pos += spec["nbuf"]
    if pos != len(raw):
        raise ProtocolError(ErrorCode.MALFORMED, f"{len(raw) - pos} buffer frames that no tensor claims")
    return Message(body=body, id=msg_id, tensors=tensors)


def error_message(code: str, message: str, msg_id: int = 0, plan: dict | None = None) -> Message:
    return Message(ErrorReply(code, message, plan), id=msg_id)

