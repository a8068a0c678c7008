"""Codec names to codec classes, and decoding of any message by the name in its header.

Every message says which codec wrote it (`header["codec"]`), so a receiver needs no
configuration to decode: `decode(message)` looks the name up here. Encoders are made
with `get(name, **settings)`, which checks the settings against the codec's settings
dataclass and refuses unknown ones by name, so a typo in a config never passes silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .base import Codec, CodecError, EncodedTensor
from .checks import message_parts
from .cpu import CpuCodec
from .raw import RawCodec

_CODECS: dict[str, type] = {cls.name: cls for cls in (RawCodec, CpuCodec)}

# Decoding needs no settings: one default instance per codec serves every message.
_DECODERS: dict[str, Codec] = {}


def available() -> list[str]:
    """Names that `get` and `decode` accept, sorted."""
    return sorted(_CODECS)


def _codec_class(name: Any) -> type:
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; available codecs: {', '.join(available())}") from None


def get(name: str, **settings: Any) -> Codec:
    """A new codec `name` configured by `settings` (the fields of its Settings dataclass)."""
    cls = _codec_class(name)
    known = [f.name for f in dataclasses.fields(cls.Settings)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise CodecError(
            f"codec {name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"its settings are: {', '.join(known) if known else 'none'}"
        )
    return cls(cls.Settings(**settings))


def decode(message: EncodedTensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode any codec's message, dispatching on `header["codec"]`."""
    header, _ = message_parts(message)
    if "codec" not in header:
        raise CodecError("message header names no codec: it is damaged or not a codec message")
    name = header["codec"]
    decoder = _DECODERS.get(name) if isinstance(name, str) else None
    if decoder is None:
        decoder = _DECODERS.setdefault(name, _codec_class(name)())
    return decoder.decode(message, device)
