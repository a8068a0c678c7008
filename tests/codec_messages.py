"""Helpers that damage codec messages on purpose, shared by the codec tests."""

from __future__ import annotations

from comfy_mesh.codec import EncodedTensor


def with_buffer(message: EncodedTensor, i: int, data) -> EncodedTensor:
    """The message with buffer `i` replaced by `data`."""
    buffers = list(message.buffers)
    buffers[i] = data
    return EncodedTensor(dict(message.header), buffers)


def with_header(message: EncodedTensor, **changes) -> EncodedTensor:
    """The message with header fields changed; a value of KeyError removes the field."""
    header = dict(message.header)
    for key, value in changes.items():
        if value is KeyError:
            header.pop(key)
        else:
            header[key] = value
    return EncodedTensor(header, list(message.buffers))
