"""Activation codecs: `get(name, **settings)` returns a codec.

    codec = comfy_mesh.codec.get("cpu", quality=7)
    msg = codec.encode(tensor)          # EncodedTensor: header + buffers
    msg.nbytes                          # every byte that crosses the wire
    restored = codec.decode(msg)        # decode() of any codec reads msg.header["codec"]
"""

from __future__ import annotations

from .base import Codec, CodecError, EncodedTensor
from .registry import available, decode, get

__all__ = ["Codec", "CodecError", "EncodedTensor", "available", "decode", "get"]
