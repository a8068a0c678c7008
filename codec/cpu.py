"""The `cpu` codec: lossy, for machines with no GPU codec, with a hard error bound.

The tensor is read as (tokens, channels), the last dimension being the channels. Each
channel is centred on its median and scaled by a robust spread (1.4826 x the median
absolute deviation), not by min/max, because one loud token would otherwise set the step
for its whole channel. Values more than `outlier_sigma` spreads from the centre are sent
exactly, beside the stream. The rest are quantised with step = spread / quality; after
this per-channel normalisation every channel draws from one symbol distribution, so the
symbols are laid out channel-major (each channel's tokens together) and entropy coded
with zstandard as one stream.

Message: header {codec, v, shape, dtype, qdtype, n_outliers, rel_err_bound, side_crc32}
and five buffers, in this order:

0. centers   float32[C]
1. steps     float32[C]; 0 marks a constant channel (every value equals its centre)
2. symbols   zstd frame of qdtype[C, T] (channel-major), with content size and checksum
3. outlier positions: zstd frame of the gaps between sorted flat indices into the
   original (row-major) tensor, the first gap counted from 0; uint32 when the tensor
   has at most 2**32 elements, else uint64. Empty when there are no outliers.
4. outlier values float32[n_outliers], exact

The zstd frames carry their own checksums; `side_crc32` (zlib CRC-32 over buffers 0, 1
and 4, in order) covers the rest, so that damage anywhere is refused, never decoded
into plausible but wrong numbers.

`rel_err_bound` is a hard bound on ||decoded - x|| / ||x||, derived at encode time from
per-element bounds (half a step for quantised values, float32 rounding of the
arithmetic, rounding of the cast back to the original dtype), not measured, so that it
holds for any decoder that does the same arithmetic in float32, with or without fused
multiply-add.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard

from .base import CodecError, EncodedTensor
from .robust import channel_stats, check_values, fallback_spread, setting_int, setting_number
from .checks import (
    check_codec_and_version,
    dtype_name,
    expect_buffers,
    expect_size,
    header_count,
    header_dtype,
    header_field,
    header_shape,
    input_tensor,
    message_parts,
    to_device,
)

log = logging.getLogger(__name__)

#: Format version written into every cpu header; decode refuses any other.
FORMAT_VERSION = 1

#: Number of buffers in a cpu message (see the module docstring for the layout).
N_BUFFERS = 5

_QDTYPES: dict[str, np.dtype] = {
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
}
_QDTYPE_TORCH = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}

# Rounding of float32 arithmetic (unit roundoff) and of the cast back to the original
# dtype: (relative unit roundoff, absolute error of the smallest subnormal / 2).
_U32 = 2.0**-24
_TINY32 = float(np.finfo(np.float32).tiny)
_CAST_ROUNDING: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (0.0, 0.0),
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float16: (2.0**-11, 2.0**-25),
}


@dataclass(frozen=True)
class CpuSettings:
    """Encoder settings; the decoder needs none (each message describes itself)."""

    #: quantisation levels per robust standard deviation (step = spread / quality);
    #: higher is more accurate and larger. Unit: 1 / robust std.
    quality: float = 7.0
    #: distance from the channel median, in robust standard deviations, beyond which a
    #: value is an outlier and is sent exactly. Unit: robust std.
    outlier_sigma: float = 8.0
    #: zstandard compression level for the symbols and outlier positions (1 fast .. 22).
    zstd_level: int = 1
    #: at most this many tokens (evenly spaced) estimate each channel's median and
    #: spread; 0 uses every token. Only the statistics are sampled: every value is still
    #: quantised and the error bound stays exact. Unit: tokens.
    stats_tokens: int = 1024

    def __post_init__(self) -> None:
        quality = setting_number(self.quality, "cpu", "quality")
        sigma = setting_number(self.outlier_sigma, "cpu", "outlier_sigma")
        level = setting_int(self.zstd_level, "cpu", "zstd_level")
        stats = setting_int(self.stats_tokens, "cpu", "stats_tokens")
        if not (math.isfinite(quality) and quality > 0):
            raise CodecError(f"cpu codec quality must be a positive number, got {quality}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise CodecError(f"cpu codec outlier_sigma must be a positive number, got {sigma}")
        if quality * sigma > 2.0**30:
            raise CodecError(
                f"cpu codec quality x outlier_sigma = {quality * sigma:g} is too large "
                "(symbols would not fit int32); lower one of them or use the raw codec"
            )
        if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise CodecError(
                f"cpu codec zstd_level must be at most {zstandard.MAX_COMPRESSION_LEVEL}, got {level}"
            )
        if stats < 0:
            raise CodecError(f"cpu codec stats_tokens must be >= 0, got {stats}")
        object.__setattr__(self, "quality", quality)
        object.__setattr__(self, "outlier_sigma", sigma)


@dataclass(frozen=True)
class CpuPayload:
    """A cpu message, checked and unpacked: everything decode rebuilds the tensor from."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    #: float32[C]: per-channel centre (a median)
    centers: np.ndarray
    #: float32[C]: per-channel quantisation step; 0 for a constant channel
    steps: np.ndarray
    #: int8/int16/int32 [C, T], channel-major; 0 where a value is an outlier
    symbols: np.ndarray
    #: int64[n]: sorted flat indices of the outliers into the original tensor
    outlier_index: np.ndarray
    #: float32[n]: the outliers' exact values
    outlier_value: np.ndarray

    @property
    def tokens(self) -> int:
        return self.symbols.shape[1]

    @property
    def channels(self) -> int:
        return self.symbols.shape[0]


def _tokens_channels(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (tokens, channels) view of a shape: channels are the last dimension."""
    channels = shape[-1] if shape else 1
    numel = math.prod(shape)
    return (numel // channels if channels else 0), channels


def _index_dtype(numel: int) -> np.dtype:
    return np.dtype(np.uint32) if numel <= 2**32 else np.dtype(np.uint64)


class CpuCodec:
    """Lossy CPU codec: robust per-channel quantisation, exact outliers, zstandard."""

    name = "cpu"
    format_version = FORMAT_VERSION
    Settings = CpuSettings

    def __init__(self, settings: CpuSettings | None = None) -> None:
        self.settings = settings or CpuSettings()

    # ----------------------------------------------------------------- encode

    def encode(self, tensor: torch.Tensor, *, state=None, layout=None) -> EncodedTensor:
        # Stateless and layout-blind: `state` and `layout` are accepted and ignored.
        t = input_tensor(tensor)
        shape = tuple(t.shape)
        tokens, channels = _tokens_channels(shape)
        # A private float32 copy: it turns into x - c, then into the symbols, in place
        # (fresh large allocations cost page faults that measured as much as the math).
        dev = t.reshape(tokens, channels).to(torch.float32, copy=True)
        check_values(dev, "cpu")
        sum_sq = _sum_squares(dev)
        centers, spread = channel_stats(dev, self.settings.stats_tokens)
        dev.sub_(centers)
        absdev = dev.abs()
        maxdev = absdev.amax(dim=0) if tokens else torch.zeros(channels)
        spread = fallback_spread(spread, absdev, maxdev)
        steps = torch.where(
            maxdev > 0,
            (spread / self.settings.quality).clamp_min(_TINY32),
            torch.zeros(()),
        )
        outlier = absdev > spread * self.settings.outlier_sigma
        del absdev

        # Symbols: round((x - c) / step), 0 at outliers and in constant channels.
        dev.div_(torch.where(steps > 0, steps, torch.ones(()))).masked_fill_(outlier, 0.0).round_()
        qmax = max(-float(dev.min()), float(dev.max())) if dev.numel() else 0.0
        qdtype = "int8" if qmax <= 127 else "int16" if qmax <= 32767 else "int32"
        symbols = dev.to(_QDTYPE_TORCH[qdtype]).t().contiguous().numpy()
        del dev

        flat_outlier = outlier.view(-1).nonzero().view(-1)
        # From the input itself: exact in float32 whatever its dtype.
        outlier_value = t.reshape(-1)[flat_outlier].to(torch.float32).numpy()
        outlier_index = flat_outlier.numpy()
        n_outliers = int(outlier_index.size)

        bound = _rel_err_bound(
            sum_sq=sum_sq,
            centers=centers.numpy(),
            steps=steps.numpy(),
            outliers_per_channel=np.bincount(outlier_index % max(channels, 1), minlength=channels),
            tokens=tokens,
            out_dtype=t.dtype,
        )

        zc = zstandard.ZstdCompressor(
            level=self.settings.zstd_level, write_checksum=True, write_content_size=True
        )
        index_bytes = b""
        if n_outliers:
            gaps = np.diff(outlier_index, prepend=0).astype(_index_dtype(tokens * channels))
            index_bytes = zc.compress(gaps.tobytes())
        buffers = [
            centers.numpy().astype(np.float32).tobytes(),
            steps.numpy().astype(np.float32).tobytes(),
            zc.compress(symbols),
            index_bytes,
            outlier_value.astype(np.float32).tobytes(),
        ]
        header = {
            "codec": self.name,
            "v": FORMAT_VERSION,
            "shape": list(shape),
            "dtype": dtype_name(t.dtype),
            "qdtype": qdtype,
            "n_outliers": n_outliers,
            "rel_err_bound": bound,
            "side_crc32": _side_crc32(buffers[0], buffers[1], buffers[4]),
        }
        message = EncodedTensor(header, buffers)
        log.debug(
            "cpu codec: %s %s -> %d bytes, %s symbols, %d outliers, rel_err_bound %.4g",
            header["dtype"], shape, message.nbytes, qdtype, n_outliers, bound,
        )
        return message

    # ----------------------------------------------------------------- decode

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *, state=None) -> torch.Tensor:
        """A new, writable tensor of the original shape and dtype."""
        p = unpack(message)
        tokens, channels = _tokens_channels(p.shape)
        # Transpose the 1-byte symbols, not the 4-byte floats: far less memory traffic.
        y = torch.from_numpy(p.symbols).t().contiguous().to(torch.float32)
        y.mul_(torch.from_numpy(p.steps)).add_(torch.from_numpy(p.centers))
        if p.outlier_index.size:
            y.view(-1)[torch.from_numpy(p.outlier_index)] = torch.from_numpy(p.outlier_value)
        if p.dtype != torch.float32:
            # Rounding may step just past the original dtype's range; the original
            # value was inside it, so clamping never adds error.
            limit = float(torch.finfo(p.dtype).max)
            y.clamp_(-limit, limit)
            y = y.to(p.dtype)
        return to_device(y.reshape(p.shape), device)


def _sum_squares(x: torch.Tensor) -> float:
    """sum(x^2) accumulated in float64; float32 squares are exact in float64, and
    cannot overflow since |x| <= MAX_ABS."""
    flat = x.view(-1).numpy()
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def _rel_err_bound(
    sum_sq: float,
    centers: np.ndarray,
    steps: np.ndarray,
    outliers_per_channel: np.ndarray,
    tokens: int,
    out_dtype: torch.dtype,
) -> float:
    """A hard upper bound on ||decode(encode(x)) - x|| / ||x||.

    Per quantised element of channel c (x - c = t * step exactly, q = round(fl(t))):
        |x_hat32 - x| <= step/2 + 2^-21 (|x| + |c| + step) + 2^-147
    which covers the float32 rounding of x - c, of the division, of q * step and of the
    addition (a fused multiply-add only rounds less). Outliers and constant channels
    are exact. The cast to the original dtype adds u |x_hat32| + eta (u = 2^-8 for
    bfloat16, 2^-11 for float16; eta = half the smallest subnormal); clamping to the
    dtype's range only moves x_hat toward x. Norms combine by Minkowski's inequality,
    and ||x|| (from `sum_sq`, a float64 sum of squares) is taken slightly low, so that
    rounding in the bound's own arithmetic cannot make it too small.
    """
    quantised = np.where(steps > 0, tokens - outliers_per_channel, 0).astype(np.float64)
    n_quantised = float(quantised.sum())
    if n_quantised == 0:
        return 0.0
    x_hi = math.sqrt(sum_sq * (1 + 2.0**-20))
    x_lo = math.sqrt(sum_sq * (1 - 2.0**-20))
    steps64 = steps.astype(np.float64)
    e_quant = math.sqrt(float(np.sum(quantised * (steps64 / 2) ** 2)))
    e_fp = (
        2.0**-21 * (x_hi + math.sqrt(float(np.sum(quantised * (np.abs(centers.astype(np.float64)) + steps64) ** 2))))
        + math.sqrt(n_quantised) * 2.0**-147
    )
    e32 = e_quant + e_fp
    u_out, eta_out = _CAST_ROUNDING[out_dtype]
    total = e32 + u_out * (x_hi + e32) + math.sqrt(n_quantised) * eta_out
    return float(total / x_lo * (1 + 2.0**-40))


def unpack(message: EncodedTensor) -> CpuPayload:
    """Check a cpu message completely and unpack it; CodecError on anything amiss.

    Exposed for tests and tools that want the centres, steps and outliers themselves.
    """
    header, buffers = message_parts(message)
    check_codec_and_version(header, CpuCodec.name, FORMAT_VERSION)
    shape = header_shape(header)
    dtype = header_dtype(header)
    qname = header_field(header, "qdtype", str)
    if qname not in _QDTYPES:
        raise CodecError(f"cpu message header qdtype is {qname!r}; known: {sorted(_QDTYPES)}")
    qdtype = _QDTYPES[qname]
    n_outliers = header_count(header, "n_outliers")
    bound = header_field(header, "rel_err_bound", (int, float))
    if not (math.isfinite(bound) and bound >= 0):
        raise CodecError(f"cpu message header rel_err_bound is {bound!r}, not a finite number >= 0")
    tokens, channels = _tokens_channels(shape)
    numel = tokens * channels
    if n_outliers > numel:
        raise CodecError(f"cpu message claims {n_outliers} outliers in a tensor of {numel} elements")

    centers_buf, steps_buf, symbols_buf, index_buf, values_buf = expect_buffers(buffers, N_BUFFERS, "cpu")
    expect_size(centers_buf, channels * 4, "cpu centers buffer")
    expect_size(steps_buf, channels * 4, "cpu steps buffer")
    expect_size(values_buf, n_outliers * 4, "cpu outlier values buffer")
    if _side_crc32(centers_buf, steps_buf, values_buf) != header_count(header, "side_crc32"):
        raise CodecError("cpu message centers, steps or outlier values fail their CRC-32: the message is damaged")
    centers = np.frombuffer(centers_buf, dtype=np.float32)
    steps = np.frombuffer(steps_buf, dtype=np.float32)
    values = np.frombuffer(values_buf, dtype=np.float32)
    if not (np.isfinite(centers).all() and np.isfinite(steps).all() and np.isfinite(values).all()):
        raise CodecError("cpu message holds NaN or Inf centers, steps or outlier values: it is damaged")
    if (steps < 0).any():
        raise CodecError("cpu message holds negative steps: it is damaged")

    symbols = _unzstd(symbols_buf, numel * qdtype.itemsize, "cpu symbols")
    symbols = np.frombuffer(symbols, dtype=qdtype).reshape(channels, tokens)

    if n_outliers:
        index_dtype = _index_dtype(numel)
        gaps = np.frombuffer(
            _unzstd(index_buf, n_outliers * index_dtype.itemsize, "cpu outlier positions"), dtype=index_dtype
        )
        if float(gaps.sum(dtype=np.float64)) >= numel:
            raise CodecError("cpu message outlier positions run past the end of the tensor: it is damaged")
        index = np.cumsum(gaps, dtype=np.int64)
    else:
        expect_size(index_buf, 0, "cpu outlier positions buffer (no outliers)")
        index = np.zeros(0, dtype=np.int64)
    return CpuPayload(
        shape=shape,
        dtype=dtype,
        centers=centers.copy(),
        steps=steps.copy(),
        symbols=symbols,
        outlier_index=index,
        outlier_value=values.copy(),
    )


def _side_crc32(*buffers: Any) -> int:
    crc = 0
    for buf in buffers:
        crc = zlib.crc32(buf, crc)
    return crc


def _unzstd(view: memoryview, nbytes: int, what: str) -> bytearray:
    """Decompress one zstd frame of exactly `nbytes` into writable memory."""
    try:
        declared = zstandard.frame_content_size(view)
        if declared != nbytes:
            raise CodecError(
                f"{what}: the zstd frame declares {declared} bytes, the header implies "
                f"{nbytes}: the message is damaged"
            )
        # A decompressobj, unlike decompress(), reports bytes left after the frame.
        stream = zstandard.ZstdDecompressor().decompressobj(write_size=max(nbytes, 1))
        data = stream.decompress(view)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: the zstd stream is damaged ({exc})") from None
    if not stream.eof:
        raise CodecError(f"{what}: the zstd stream ends early: the message was truncated")
    if stream.unused_data:
        raise CodecError(f"{what}: {len(stream.unused_data)} stray bytes follow the zstd frame: the message is damaged")
    if len(data) != nbytes:
        raise CodecError(f"{what}: decompressed to {len(data)} bytes, expected {nbytes}: the message is damaged")
    # Writable memory, so that torch.from_numpy may wrap it without a warning.
    return bytearray(data)
