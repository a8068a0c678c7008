"""Checks on messages that arrive from elsewhere, shared by every backend.

A message may come from another process, another version of comfy-mesh, or a damaged
link. Every header field and buffer is checked here before a backend trusts it, and
every failure is a `CodecError` whose text says what was wrong and what to do, never
a KeyError, a numpy exception or a crash. Dtype names also live here, so that every
backend writes the same spelling into its headers.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CodecError

#: Dtypes the codecs accept, by the name written into headers.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The header name of a tensor dtype; CodecError for one no codec handles."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(
            f"cannot encode a {dtype} tensor: the codecs take {sorted(DTYPES)}; "
            "cast it first"
        ) from None


def input_tensor(tensor: Any) -> torch.Tensor:
    """The tensor an encoder works on: detached, on the CPU, contiguous.

    No copy is made when the tensor already is all three.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"codecs encode torch tensors, not {type(tensor).__name__}")
    dtype_name(tensor.dtype)
    return tensor.detach().to("cpu").contiguous()


def message_parts(message: Any) -> tuple[dict, list]:
    """The header dict and buffer list of an EncodedTensor-like message."""
    header = getattr(message, "header", None)
    buffers = getattr(message, "buffers", None)
    if not isinstance(header, dict) or not isinstance(buffers, (list, tuple)):
        raise CodecError(
            f"expected an EncodedTensor (a header dict and a list of buffers), "
            f"got {type(message).__name__}"
        )
    return header, list(buffers)


def check_codec_and_version(header: dict, codec: str, version: int) -> None:
    """The header names this codec and the format version this build decodes."""
    if header.get("codec") != codec:
        raise CodecError(
            f"the {codec!r} codec cannot decode a message whose header names codec "
            f"{header.get('codec')!r}; use comfy_mesh.codec.decode(message)"
        )
    found = header.get("v")
    if found != version or isinstance(found, bool):
        raise CodecError(
            f"{codec!r} message has format version {found!r}, but this build decodes "
            f"version {version}: run the same comfy-mesh version on both sides"
        )


def header_field(header: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """`header[key]`, which must exist and be of `kind` (bool is never an int here)."""
    if key not in header:
        raise CodecError(f"message header lacks {key!r}: the message is damaged or not a codec message")
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CodecError(f"message header field {key!r} is {value!r}, of the wrong type")
    return value


def header_count(header: dict, key: str) -> int:
    """A non-negative integer header field."""
    value = header_field(header, key, int)
    if value < 0:
        raise CodecError(f"message header field {key!r} is negative ({value})")
    return value


def header_shape(header: dict) -> tuple[int, ...]:
    """`header["shape"]`: a list of non-negative ints."""
    shape = header_field(header, "shape", (list, tuple))
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CodecError(f"message header shape {shape!r} is not a list of non-negative ints")
    return tuple(shape)


def header_dtype(header: dict, key: str = "dtype") -> torch.dtype:
    """A dtype named in the header."""
    name = header_field(header, key, str)
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"message header {key!r} is {name!r}; known dtypes are {sorted(DTYPES)}") from None


def expect_buffers(buffers: list, count: int, codec: str) -> list[memoryview]:
    """Exactly `count` buffers, each viewed as flat bytes (no copy)."""
    if len(buffers) != count:
        raise CodecError(
            f"{codec!r} message has {len(buffers)} buffers, expected {count}: "
            "frames were lost or added in transit"
        )
    return [byte_view(buf, f"{codec!r} buffer {i}") for i, buf in enumerate(buffers)]


def byte_view(buf: Any, what: str) -> memoryview:
    """A flat, read-only byte view of anything with the buffer protocol (no copy)."""
    try:
        view = memoryview(buf)
        if not view.c_contiguous:
            raise CodecError(f"{what} is not contiguous memory")
        return view.cast("B").toreadonly()
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise CodecError(f"{what} is not a byte buffer: {exc}") from None


def expect_size(view: memoryview, nbytes: int, what: str) -> None:
    """A buffer is exactly as long as the header says it must be."""
    if view.nbytes != nbytes:
        raise CodecError(
            f"{what} holds {view.nbytes} bytes, but the header implies {nbytes}: "
            "the message was truncated or damaged"
        )


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Move a decoded tensor where the caller wants it (unchanged when device is None)."""
    if device is None:
        return tensor
    try:
        return tensor.to(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot move the decoded tensor to device {device!r}: {exc}") from None
