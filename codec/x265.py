"""The `x265` codec: activations as HEVC video, encoded on the CPU by libx265 (PyAV).

It writes the bitstream NVENC writes (the `nvenc` codec shares this module's message
format and `HevcCodec` base): a raw Annex-B HEVC elementary stream, 8-bit, 4:4:4
(yuv444p, what NVENC encodes) or 4:0:0 (gray, x265 only), every frame an IDR picture
that carries its own VPS/SPS/PPS, at one constant QP. So packing, bitstream and decoding
are exercised without NVIDIA hardware, and any HEVC decoder (FFmpeg's software decoder,
NVDEC) decodes either codec's messages.

Packing (per-channel robust scaling to 8 bits, exact outliers, token tiles on frames) is
`video_pack`'s. Encoder settings suited to one-shot frames: intra only (keyint 1, no B
frames: the frames of one message hold different channels, so inter prediction has
nothing to find; correlation across sampler steps is a job for a temporal codec), constant
QP on every frame (ipratio = pbratio = 1), no adaptive quantisation and no psycho-visual
tuning (they trade accuracy for looks), no SEI banner.

Quality -> QP. `quality` has the `cpu` codec's meaning (about spread / (quality sqrt 12)
of error per value on noise-like content) and maps to a QP through
`video_pack.qp_for_quality` (with clip_sigma 6: quality 4 -> QP 18, 7 -> 13, 10 -> 9;
above ~10 the QP stays near 9 and the 8-bit range narrows instead, 63.5 / quality
spreads); `qp` sets the QP directly instead (0..51; lower is more accurate and larger).

Error statement. HEVC is not a bounded-error codec, so the encoder decodes its own
bitstream once (FFmpeg's software decoder; about a tenth of the encode time here) and
states two numbers:

* `rel_err_measured`: ||decode(message) - x|| / ||x|| for this build's decoder;
* `rel_err_bound`: a hard upper bound on that ratio for any receiver that decodes the
  stream with a conforming HEVC decoder and dequantises in float32 (any operation order,
  with or without fused multiply-add). HEVC decoding is specified bit-exactly, so every
  conforming decoder (libavcodec, NVDEC: `bench/nvdec_check.py` checks it) produces the
  frames the encoder decoded; the bound adds the float32 rounding slack of the
  dequantisation and the rounding of the cast back to bfloat16/float16 (as the cpu
  codec's bound does), so it is slightly above the measured value.

Message: header {codec, v, shape, dtype, pix_fmt, grid_width, prefix_tokens, frame_w,
frame_h, n_frames, frame_bytes, qp, n_outliers, rel_err_bound, rel_err_measured,
side_crc32, stream_crc32} and five buffers:

0. centers   float32[C]
1. steps     float32[C]; 0 marks a constant channel
2. bitstream Annex-B HEVC, the n_frames access units back to back (sizes in frame_bytes)
3. outlier positions: zstd frame of the gaps between sorted flat indices (uint32 when the
   tensor has at most 2**32 elements, else uint64); empty when there are none
4. outlier values float32[n_outliers], exact

`side_crc32` (zlib CRC-32 over the header fields that steer decoding: shape, dtype,
pix_fmt, grid_width, prefix_tokens, frame_bytes, qp, n_outliers, as compact JSON, then
buffers 0, 1 and 4) and `stream_crc32` (over buffer 2) make damage anywhere a CodecError
rather than a plausible wrong tensor: HEVC decoders conceal errors instead of reporting
them, and a shape one token short would still fit the same frames.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import zlib
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch
import zstandard

from .base import CodecError, EncodedTensor
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
from .video_pack import (
    PIX_FMTS,
    Layout,
    PackSettings,
    PackSide,
    cast_output,
    check_frames,
    dequantise,
    effective_clip,
    pack,
    plan_layout,
    qp_for_quality,
    split_shape,
)

log = logging.getLogger(__name__)

#: Format version of x265 and nvenc messages; decode refuses any other.
FORMAT_VERSION = 1
#: Buffers in a message (see the module docstring).
N_BUFFERS = 5
#: x265 presets, fastest first.
X265_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

# Rounding of the cast back to the original dtype: (unit roundoff, half the smallest
# subnormal), as in the cpu codec's bound.
_CAST_ROUNDING: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (0.0, 0.0),
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float16: (2.0**-11, 2.0**-25),
}


# --------------------------------------------------------------------------- capability


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


@functools.lru_cache(maxsize=None)
def _av_codecs() -> tuple[Any, str]:
    """(the av module, "") or (None, why not)."""
    try:
        import av  # noqa: PLC0415 - optional dependency, imported on first use
    except Exception as exc:  # any failure to import means "unavailable", with the reason
        return None, f"PyAV is not importable ({_first_line(exc)}); install it: pip install 'comfy-mesh[video]'"
    return av, ""


@functools.lru_cache(maxsize=None)
def x265_capability() -> tuple[bool, str]:
    """(usable, reason): can this process encode with libx265 through PyAV?"""
    av, reason = _av_codecs()
    if av is None:
        return False, reason
    if "libx265" not in av.codecs_available:
        return False, f"this PyAV build ({av.__version__}) has no libx265 encoder"
    ok, reason = software_decoder_capability()
    if not ok:
        return False, reason
    return True, f"PyAV {av.__version__} with libx265 and FFmpeg's HEVC decoder"


@functools.lru_cache(maxsize=None)
def software_decoder_capability() -> tuple[bool, str]:
    """(usable, reason): can this process decode HEVC in software (FFmpeg via PyAV)?"""
    av, reason = _av_codecs()
    if av is None:
        return False, reason
    if "hevc" not in av.codecs_available:
        return False, f"this PyAV build ({av.__version__}) has no HEVC decoder"
    return True, f"PyAV {av.__version__} (FFmpeg's HEVC decoder)"


# --------------------------------------------------------------------------- settings


def pack_settings(settings: Any) -> PackSettings:
    """The PackSettings inside a codec's settings (checked on construction)."""
    return PackSettings(**{f.name: getattr(settings, f.name) for f in fields(PackSettings)})


@dataclass(frozen=True)
class VideoSettings:
    """What the x265 and nvenc codecs' settings share: their accuracy and how tokens
    become frames (the PackSettings fields). The decoder needs none (each message
    describes itself). Each codec adds `codec_name`, `pix_fmt` and its own fields."""

    #: accuracy on the cpu codec's scale (error ~ spread / (quality sqrt 12) on noise-like
    #: content); sets the QP unless `qp` is given. Unit: 1 / robust std.
    quality: float = 7.0
    #: constant HEVC QP 0..51 (lower: more accurate, larger); -1 derives it from quality.
    qp: int = -1
    #: 8-bit range in robust spreads (narrowed to 63.5 / quality at high quality); values
    #: beyond are sent exactly. Unit: robust std.
    clip_sigma: float = 6.0
    #: tokens (evenly spaced) that estimate each channel's median and spread; 0: all.
    stats_tokens: int = 1024
    #: tokens per row of the token grid (latent width); 0: near-square. Unit: tokens.
    grid_width: int = 0
    #: leading non-spatial (text) tokens, laid out before the grid. Unit: tokens.
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        quality = self.quality
        if isinstance(quality, bool) or not isinstance(quality, (int, float)):
            raise CodecError(f"{self.codec_name} codec quality must be a number, got {quality!r}")
        if not (math.isfinite(quality) and quality > 0):
            raise CodecError(f"{self.codec_name} codec quality must be a positive number, got {quality}")
        qp = self.qp
        if isinstance(qp, bool) or not isinstance(qp, int) or not -1 <= qp <= 51:
            raise CodecError(f"{self.codec_name} codec qp must be an int in 0..51 (or -1: from quality), got {qp!r}")
        object.__setattr__(self, "quality", float(quality))
        pack_settings(self)


@dataclass(frozen=True)
class X265Settings(VideoSettings):
    """Encoder settings of the x265 codec (VideoSettings, and these)."""

    #: "yuv444p" (NVENC's format) or "gray" (one plane per frame).
    pix_fmt: str = "yuv444p"
    #: x265 speed preset (ultrafast .. veryslow); on noise-like activations the slower
    #: presets gain under 1 % in size.
    preset: str = "ultrafast"

    codec_name = "x265"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in X265_PRESETS:
            raise CodecError(f"x265 codec preset must be one of {', '.join(X265_PRESETS)}, got {self.preset!r}")


# --------------------------------------------------------------------------- the shared format


def _index_dtype(numel: int) -> np.dtype:
    return np.dtype(np.uint32) if numel <= 2**32 else np.dtype(np.uint64)


def _crc32(*buffers: Any) -> int:
    crc = 0
    for buf in buffers:
        crc = zlib.crc32(buf, crc)
    return crc


#: Header fields covered by side_crc32, in this order.
_CRC_FIELDS = ("shape", "dtype", "pix_fmt", "grid_width", "prefix_tokens", "frame_bytes", "qp", "n_outliers")


def _side_crc32(header: dict, centers: Any, steps: Any, values: Any) -> int:
    fields_json = json.dumps([header.get(k) for k in _CRC_FIELDS], separators=(",", ":")).encode()
    return _crc32(fields_json, centers, steps, values)


def _unzstd(view: memoryview, nbytes: int, what: str) -> bytes:
    try:
        if zstandard.frame_content_size(view) != nbytes:
            raise CodecError(f"{what}: the zstd frame does not declare the {nbytes} bytes the header implies: it is damaged")
        stream = zstandard.ZstdDecompressor().decompressobj(write_size=max(nbytes, 1))
        data = stream.decompress(view)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: the zstd stream is damaged ({exc})") from None
    if not stream.eof or stream.unused_data or len(data) != nbytes:
        raise CodecError(f"{what}: the zstd stream is truncated or has stray bytes: the message is damaged")
    return data


def _sum_squares(x: torch.Tensor) -> float:
    flat = x.reshape(-1).numpy()
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def _slack32(side: PackSide, rows: int) -> float:
    """||difference between two float32 evaluations of (v - 128) * step + c|| bound:
    per element at most 2^-21 (|c| + 128 step) (two roundings each, either order); none
    in constant channels, where 0 * (v - 128) + c is c exactly."""
    steps = side.steps.astype(np.float64)
    per_channel = np.where(steps > 0, (np.abs(side.centers.astype(np.float64)) + 128.0 * steps) ** 2, 0.0)
    return 2.0**-21 * math.sqrt(rows * float(per_channel.sum()))


def _relative(err: float, sum_sq: float, rows: int, channels: int, dtype: torch.dtype) -> float:
    """A float32-reconstruction error bound turned into a bound on the relative error of
    the output in `dtype` (cast rounding by Minkowski, ||x|| taken slightly low)."""
    x_hi = math.sqrt(sum_sq * (1 + 2.0**-20))
    x_lo = math.sqrt(sum_sq * (1 - 2.0**-20))
    u_out, eta_out = _CAST_ROUNDING[dtype]
    total = err + u_out * (x_hi + err) + math.sqrt(rows * channels) * eta_out
    return float(total / x_lo * (1 + 2.0**-40))


def error_statement(t: torch.Tensor, y32: torch.Tensor, side: PackSide) -> tuple[float, float]:
    """(rel_err_bound, rel_err_measured) of the reconstruction y32 (rows, C) float32 that a
    conforming decoder produces from this message, for the input t."""
    items, tokens, channels = split_shape(side.shape)
    rows = items * tokens
    x32 = t.reshape(rows, channels).to(torch.float32)
    sum_sq = _sum_squares(x32)
    if sum_sq == 0.0 or not (side.steps > 0).any():  # constant channels only: exact
        return 0.0, 0.0
    diff = y32 - x32
    err32 = math.sqrt(_sum_squares(diff)) * (1 + 2.0**-22)
    bound = _relative(err32 + _slack32(side, rows), sum_sq, rows, channels, t.dtype)
    if t.dtype == torch.float32:
        measured = math.sqrt(_sum_squares(diff) / sum_sq)
    else:
        out = cast_output(y32.clone(), t.dtype).to(torch.float32).sub_(x32)
        measured = math.sqrt(_sum_squares(out) / sum_sq)
    return bound, min(measured, bound)


def a_priori_bound(t: torch.Tensor, side: PackSide) -> float:
    """A hard bound that needs no decode (loose): every decoded code lies in 0..255, so a
    non-outlier value is off by at most |x - c| + 128 step."""
    items, tokens, channels = split_shape(side.shape)
    rows = items * tokens
    x32 = t.reshape(rows, channels).to(torch.float32)
    sum_sq = _sum_squares(x32)
    if sum_sq == 0.0 or not (side.steps > 0).any():
        return 0.0
    dev = math.sqrt(_sum_squares(x32 - torch.from_numpy(side.centers))) * (1 + 2.0**-22)
    steps = side.steps.astype(np.float64)
    err = dev + 128.0 * math.sqrt(rows * float((steps**2).sum())) * (1 + 2.0**-40) + _slack32(side, rows)
    return _relative(err, sum_sq, rows, channels, t.dtype)


@dataclass(frozen=True)
class HevcPayload:
    """A checked x265/nvenc message: side information and the access units."""

    side: PackSide
    packets: list[memoryview]
    qp: int
    pix_fmt: str


def parse_message(message: EncodedTensor, codec: str) -> HevcPayload:
    """Check an x265/nvenc message completely; CodecError on anything amiss."""
    header, buffers = message_parts(message)
    check_codec_and_version(header, codec, FORMAT_VERSION)
    shape = header_shape(header)
    dtype = header_dtype(header)
    pix_fmt = header_field(header, "pix_fmt", str)
    if pix_fmt not in PIX_FMTS:
        raise CodecError(f"{codec!r} message pix_fmt is {pix_fmt!r}; known: {sorted(PIX_FMTS)}")
    grid_width = header_count(header, "grid_width")
    prefix_tokens = header_count(header, "prefix_tokens")
    qp = header_count(header, "qp")
    if qp > 51:
        raise CodecError(f"{codec!r} message qp is {qp}, outside HEVC's 0..51: it is damaged")
    n_outliers = header_count(header, "n_outliers")
    for key in ("rel_err_bound", "rel_err_measured"):
        if key in header or key == "rel_err_bound":
            value = header_field(header, key, (int, float))
            if not (math.isfinite(value) and value >= 0):
                raise CodecError(f"{codec!r} message {key} is {value!r}, not a finite number >= 0")
    items, tokens, channels = split_shape(shape)
    numel = items * tokens * channels
    if numel > 2**40:
        raise CodecError(f"{codec!r} message claims a tensor of {numel} elements: it is damaged")
    if n_outliers > numel:
        raise CodecError(f"{codec!r} message claims {n_outliers} outliers in a tensor of {numel} elements")
    if grid_width > 8192:
        raise CodecError(f"{codec!r} message grid_width {grid_width} is beyond any frame: it is damaged")
    layout = plan_layout(shape, PIX_FMTS[pix_fmt], grid_width, prefix_tokens)
    claimed = (header_count(header, "frame_w"), header_count(header, "frame_h"), header_count(header, "n_frames"))
    if claimed != (layout.width, layout.height, layout.frames):
        raise CodecError(
            f"{codec!r} message says {claimed[2]} frames of {claimed[0]}x{claimed[1]}, but its shape "
            f"{list(shape)} lays out as {layout.frames} frames of {layout.width}x{layout.height}: "
            "the header is damaged or from another version"
        )
    frame_bytes = header_field(header, "frame_bytes", (list, tuple))
    if len(frame_bytes) != layout.frames or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in frame_bytes
    ):
        raise CodecError(f"{codec!r} message frame_bytes {frame_bytes!r} is not {layout.frames} positive sizes")

    centers_buf, steps_buf, stream_buf, index_buf, values_buf = expect_buffers(buffers, N_BUFFERS, codec)
    expect_size(centers_buf, channels * 4, f"{codec} centers buffer")
    expect_size(steps_buf, channels * 4, f"{codec} steps buffer")
    expect_size(values_buf, n_outliers * 4, f"{codec} outlier values buffer")
    expect_size(stream_buf, sum(frame_bytes), f"{codec} bitstream")
    if _side_crc32(header, centers_buf, steps_buf, values_buf) != header_count(header, "side_crc32"):
        raise CodecError(
            f"{codec!r} message header fields, centers, steps or outlier values fail their CRC-32: "
            "the message is damaged"
        )
    if _crc32(stream_buf) != header_count(header, "stream_crc32"):
        raise CodecError(f"{codec!r} message bitstream fails its CRC-32: the message is damaged")
    centers = np.frombuffer(centers_buf, dtype=np.float32).copy()
    steps = np.frombuffer(steps_buf, dtype=np.float32).copy()
    values = np.frombuffer(values_buf, dtype=np.float32).copy()
    if not (np.isfinite(centers).all() and np.isfinite(steps).all() and np.isfinite(values).all()):
        raise CodecError(f"{codec!r} message holds NaN or Inf centers, steps or outlier values: it is damaged")
    if (steps < 0).any():
        raise CodecError(f"{codec!r} message holds negative steps: it is damaged")
    if n_outliers:
        index_dtype = _index_dtype(numel)
        gaps = np.frombuffer(_unzstd(index_buf, n_outliers * index_dtype.itemsize, f"{codec} outlier positions"), dtype=index_dtype)
        if float(gaps.sum(dtype=np.float64)) >= numel:
            raise CodecError(f"{codec!r} message outlier positions run past the end of the tensor: it is damaged")
        index = np.cumsum(gaps, dtype=np.int64)
    else:
        expect_size(index_buf, 0, f"{codec} outlier positions buffer (no outliers)")
        index = np.zeros(0, dtype=np.int64)
    side = PackSide(shape, dtype, layout, centers, steps, index, values)
    packets, start = [], 0
    for n in frame_bytes:
        packets.append(stream_buf[start : start + n])
        start += n
    return HevcPayload(side=side, packets=packets, qp=qp, pix_fmt=pix_fmt)


class HevcCodec:
    """Shared encode/decode of x265 and nvenc messages; subclasses move frames through
    an HEVC encoder (`_encode_frames`) and decoder (`_decode_frames`)."""

    name = "hevc"
    Settings: type = X265Settings
    format_version = FORMAT_VERSION

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings or self.Settings()
        self._pack = pack_settings(self.settings)

    # -- what subclasses provide

    def _encode_frames(self, frames: Sequence[np.ndarray], layout: Layout, qp: int) -> list[bytes]:
        raise NotImplementedError

    def _decode_frames(self, packets: Sequence[Any], layout: Layout) -> list[np.ndarray]:
        raise NotImplementedError

    def _measure(self) -> bool:
        """Decode once at encode time to measure the error (else an a-priori bound)."""
        return True

    # -- encode

    def qp_and_clip(self) -> tuple[int, float]:
        """The QP and 8-bit range (robust spreads) this encoder uses."""
        clip = effective_clip(self.settings.quality, self._pack.clip_sigma)
        qp = self.settings.qp if self.settings.qp >= 0 else qp_for_quality(self.settings.quality, clip)
        return qp, clip

    def pack_settings_for(self, shape: Sequence[int], layout: Any = None) -> PackSettings:
        """The packing for a tensor of `shape`: the settings' own grid, or, where they
        leave it automatic (grid_width 0), the caller's TokenLayout hint (n_txt text
        tokens, then an h x w image grid) when it matches the token count."""
        hint_w = getattr(layout, "w", 0)
        if self._pack.grid_width or layout is None or not isinstance(hint_w, int) or hint_w <= 0:
            return self._pack
        if getattr(layout, "tokens", None) != split_shape(shape)[1] or hint_w > 8192:
            log.debug("%s codec: token layout hint %s does not match shape %s; ignored", self.name, layout, tuple(shape))
            return self._pack
        return replace(self._pack, grid_width=hint_w, prefix_tokens=int(layout.n_txt))

    def encode(self, tensor: torch.Tensor, *, state: Any = None, layout: Any = None) -> EncodedTensor:
        """Encode; `layout` (a TokenLayout) places image tokens on their grid, `state` is
        ignored (intra-only: every message stands alone)."""
        t = input_tensor(tensor)
        qp, clip = self.qp_and_clip()
        packing = self.pack_settings_for(t.shape, layout)
        frames, side = pack(t, packing, clip)
        layout = side.layout
        packets = self._encode_frames(frames, layout, qp) if frames else []
        if len(packets) != layout.frames or not all(packets):
            raise CodecError(
                f"{self.name} encoder returned {len(packets)} access units for {layout.frames} frames; "
                "the encoder misbehaved (report this with the tensor shape)"
            )
        bound, measured = 0.0, 0.0
        if frames and self._measure():
            decoded = self._decode_frames(packets, layout)
            bound, measured = error_statement(t, dequantise(decoded, side), side)
        elif frames:
            bound, measured = a_priori_bound(t, side), None
        index_bytes = b""
        if side.n_outliers:
            gaps = np.diff(side.outlier_index, prepend=0).astype(_index_dtype(t.numel()))
            index_bytes = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(gaps.tobytes())
        bitstream = b"".join(packets)
        buffers = [side.centers.tobytes(), side.steps.tobytes(), bitstream, index_bytes, side.outlier_value.tobytes()]
        header = {
            "codec": self.name,
            "v": FORMAT_VERSION,
            "shape": list(side.shape),
            "dtype": dtype_name(t.dtype),
            "pix_fmt": packing.pix_fmt,
            "grid_width": packing.grid_width,
            "prefix_tokens": packing.prefix_tokens,
            "frame_w": layout.width,
            "frame_h": layout.height,
            "n_frames": layout.frames,
            "frame_bytes": [len(p) for p in packets],
            "qp": qp,
            "n_outliers": side.n_outliers,
            "rel_err_bound": bound,
            "stream_crc32": _crc32(bitstream),
        }
        header["side_crc32"] = _side_crc32(header, buffers[0], buffers[1], buffers[4])
        if measured is not None:
            header["rel_err_measured"] = measured
        message = EncodedTensor(header, buffers)
        log.debug(
            "%s codec: %s %s -> %d bytes (%d frames %dx%d, qp %d, %d outliers), rel err %.4g (bound %.4g)",
            self.name, header["dtype"], side.shape, message.nbytes, layout.frames, layout.width, layout.height,
            qp, side.n_outliers, measured if measured is not None else float("nan"), bound,
        )
        return message

    # -- decode

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *, state: Any = None) -> torch.Tensor:
        """A new, writable tensor of the original shape and dtype (`state` is ignored)."""
        p = parse_message(message, self.name)
        layout = p.side.layout
        frames = self._decode_frames(p.packets, layout) if layout.frames else []
        y = dequantise(frames, p.side)
        return to_device(cast_output(y, p.side.dtype).reshape(p.side.shape), device)


# --------------------------------------------------------------------------- PyAV (libx265, FFmpeg hevc)


def encode_x265(frames: Sequence[np.ndarray], layout: Layout, qp: int, preset: str = "ultrafast") -> list[bytes]:
    """One Annex-B access unit per frame (VPS/SPS/PPS + IDR slice), constant QP."""
    av, reason = _av_codecs()
    if av is None:
        raise CodecError(reason)
    pix_fmt = "yuv444p" if layout.planes == 3 else "gray"
    params = (
        f"qp={qp}:keyint=1:min-keyint=1:bframes=0:scenecut=0:ipratio=1:pbratio=1:aq-mode=0:"
        "psy-rd=0:psy-rdoq=0:info=0:repeat-headers=1:annexb=1:hash=0:log-level=error"
    )
    try:
        ctx = av.CodecContext.create("libx265", "w")
        ctx.width, ctx.height, ctx.pix_fmt = layout.width, layout.height, pix_fmt
        ctx.time_base = Fraction(1, 25)
        ctx.options = {"preset": preset, "x265-params": params}
        packets: list[bytes] = []
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame if layout.planes == 3 else frame[0], format=pix_fmt)
            picture.pts = i
            packets.extend(bytes(p) for p in ctx.encode(picture))
        packets.extend(bytes(p) for p in ctx.encode(None))
    except (av.FFmpegError, ValueError) as exc:
        raise CodecError(f"x265 encoder failed on {layout.frames} frames of {layout.width}x{layout.height}: {_first_line(exc)}") from None
    return packets


def decode_hevc_software(packets: Sequence[Any], layout: Layout) -> list[np.ndarray]:
    """Frames (planes, H, W) uint8 from Annex-B access units, by FFmpeg's HEVC decoder."""
    av, reason = _av_codecs()
    if av is None:
        raise CodecError(f"cannot decode HEVC: {reason}")
    want = "yuv444p" if layout.planes == 3 else "gray"
    try:
        ctx = av.CodecContext.create("hevc", "r")
        pictures = []
        for packet in packets:
            pictures.extend(ctx.decode(av.Packet(bytes(packet))))
        pictures.extend(ctx.decode(None))
    except (av.FFmpegError, ValueError) as exc:
        raise CodecError(f"HEVC decoder refused the bitstream ({_first_line(exc)}): the message is damaged") from None
    frames = []
    for i, picture in enumerate(pictures):
        if (picture.format.name, picture.width, picture.height) != (want, layout.width, layout.height):
            raise CodecError(
                f"HEVC frame {i} decoded as {picture.format.name} {picture.width}x{picture.height}, "
                f"the header says {want} {layout.width}x{layout.height}: the message is damaged"
            )
        frames.append(np.ascontiguousarray(picture.to_ndarray()).reshape(layout.planes, layout.height, layout.width))
    check_frames(frames, layout, "HEVC decoder output")
    return frames


class X265Codec(HevcCodec):
    """Lossy codec: HEVC on the CPU (libx265 via PyAV), decoded by FFmpeg."""

    name = "x265"
    Settings = X265Settings

    @staticmethod
    def capability() -> tuple[bool, str]:
        return x265_capability()

    @staticmethod
    def decode_capability() -> tuple[bool, str]:
        return software_decoder_capability()

    def _encode_frames(self, frames: Sequence[np.ndarray], layout: Layout, qp: int) -> list[bytes]:
        ok, reason = x265_capability()
        if not ok:
            raise CodecError(f"the x265 codec cannot encode here: {reason}")
        return encode_x265(frames, layout, qp, self.settings.preset)

    def _decode_frames(self, packets: Sequence[Any], layout: Layout) -> list[np.ndarray]:
        return decode_hevc_software(packets, layout)
