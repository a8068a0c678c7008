"""The codec interface: a tensor in, a self-describing message out, and back.

Codecs are pure: no sockets, no files. An `EncodedTensor` carries a small
JSON-serialisable header (which says how to decode it) and a list of raw buffers;
the transport sends the header as one frame and each buffer as its own frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch


class CodecError(ValueError):
    """A message cannot be encoded or decoded; the text says what was wrong."""


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor: `header` (JSON-safe dict) plus raw `buffers`.

    `header["codec"]` names the codec that decodes it; every codec adds what it
    needs (shape, dtype, scales, ...). `rel_err_bound` is a hard upper bound on
    ||decoded - original|| / ||original|| that the encoder guarantees (0 if exact).
    """

    header: dict
    buffers: list = field(default_factory=list)

    def header_bytes(self) -> bytes:
        return json.dumps(self.header, separators=(",", ":"), sort_keys=True).encode()

    @property
    def nbytes(self) -> int:
        """Every byte this message puts on the wire: header frame and buffers."""
        return len(self.header_bytes()) + sum(memoryview(b).nbytes for b in self.buffers)

    @property
    def rel_err_bound(self) -> float:
        return float(self.header.get("rel_err_bound", 0.0))


class CodecStateError(CodecError):
    """A delta message does not fit the receiver's stream state (a message was lost, or
    one end restarted): the sender must reset its state and send a key message."""


@dataclass(frozen=True)
class TokenLayout:
    """Where a carry's tokens sit: `n_txt` text tokens first, then an `h` x `w` image grid.

    A hint: codecs that exploit the grid (spatial transforms) use it, others ignore it.
    """

    n_txt: int
    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.n_txt + self.h * self.w


@dataclass
class StreamState:
    """One end's memory of one stream (one direction of one generation), for codecs that
    code the change from the previous message. Each end owns one per stream and passes
    it to every encode/decode of that stream; `reset()` starts over with a key message.
    Stateless codecs ignore it."""

    seq: int = -1  # sequence number of the last message coded or decoded
    reference: object = None  # codec-specific reconstruction both ends agree on
    signature: tuple | None = None  # shape/layout the reference belongs to

    def reset(self) -> None:
        self.seq, self.reference, self.signature = -1, None, None

    def copy(self) -> "StreamState":
        """This state to start another call from: encoding or decoding moves a state on
        (the reference is shared, not copied: codecs replace it, never change it)."""
        return replace(self)


@runtime_checkable
class Codec(Protocol):
    """What every backend provides. `name` is the registry name.

    `state` and `layout` are optional context: a stream's StreamState (temporal codecs)
    and a TokenLayout hint (spatial codecs); backends that do not use them ignore them.
    """

    name: str

    def encode(self, tensor: torch.Tensor, *, state: StreamState | None = None,
               layout: TokenLayout | None = None) -> EncodedTensor: ...

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *,
               state: StreamState | None = None) -> torch.Tensor: ...
