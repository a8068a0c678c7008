"""Activation codecs: `get(name, **settings)` returns a codec.

    codec = comfy_mesh.codec.get("gpu", rel_err=0.03)  # or "raw", "cpu", "x265", "nvenc"
    msg = codec.encode(tensor)          # EncodedTensor: header + buffers
    msg.nbytes                          # every byte that crosses the wire
    restored = codec.decode(msg)        # decode() of any codec reads msg.header["codec"]
"""

from __future__ import annotations

from .base import Codec, CodecError, CodecStateError, EncodedTensor, StreamState, TokenLayout
from .registry import available, capabilities, decode, decode_capabilities, formats, get, warm_up

__all__ = ["Codec", "CodecError", "CodecStateError", "EncodedTensor", "StreamState", "TokenLayout", "available",
           "capabilities", "decode", "decode_capabilities", "formats", "get", "warm_up"]
