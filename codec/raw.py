"""The `raw` codec: a tensor's own bytes, exact.

The right choice where bandwidth is cheap (PCIe, loopback): no compute, no loss.
Encoding makes no copy when the tensor already sits contiguous in CPU memory; the one
buffer is then a read-only view of the tensor's memory, so the caller must not modify
the tensor in place until the message has been sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import EncodedTensor
from .checks import (
    check_codec_and_version,
    dtype_name,
    expect_buffers,
    expect_size,
    header_dtype,
    header_shape,
    input_tensor,
    message_parts,
    to_device,
)

#: Format version written into every raw header; decode refuses any other.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RawSettings:
    """The raw codec has no settings; the class exists so the registry can say so."""


class RawCodec:
    """Exact codec: header {codec, v, shape, dtype} and one buffer of tensor bytes."""

    name = "raw"
    Settings = RawSettings
    format_version = FORMAT_VERSION

    def __init__(self, settings: RawSettings | None = None) -> None:
        self.settings = settings or RawSettings()

    def encode(self, tensor: torch.Tensor, *, state=None, layout=None) -> EncodedTensor:
        # Stateless and layout-blind: `state` and `layout` are accepted and ignored.
        t = input_tensor(tensor)
        header = {
            "codec": self.name,
            "v": FORMAT_VERSION,
            "shape": list(t.shape),
            "dtype": dtype_name(t.dtype),
            "rel_err_bound": 0.0,
        }
        # bfloat16 has no numpy dtype: expose the bytes through a uint8 view instead.
        data = t.reshape(-1).view(torch.uint8).numpy()
        return EncodedTensor(header, [memoryview(data).toreadonly()])

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *, state=None) -> torch.Tensor:
        """A new, writable tensor (received buffers are read-only, so this copies)."""
        header, buffers = message_parts(message)
        check_codec_and_version(header, self.name, FORMAT_VERSION)
        shape = header_shape(header)
        dtype = header_dtype(header)
        (data,) = expect_buffers(buffers, 1, self.name)
        numel = math.prod(shape)
        expect_size(data, numel * dtype.itemsize, "raw tensor data")
        out = torch.empty(numel, dtype=dtype)
        out.view(torch.uint8).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        return to_device(out.reshape(shape), device)
