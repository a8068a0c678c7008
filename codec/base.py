"""The codec interface: a tensor in, a self-describing message out, and back.

Codecs are pure: no sockets, no files. An `EncodedTensor` carries a small
JSON-serialisable header (which says how to decode it) and a list of raw buffers;
the transport sends the header as one frame and each buffer as its own frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


@runtime_checkable
class Codec(Protocol):
    """What every backend provides. `name` is the registry name."""

    name: str

    def encode(self, tensor: torch.Tensor) -> EncodedTensor: ...

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None) -> torch.Tensor: ...
