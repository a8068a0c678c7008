"""Packing activations into 8-bit video frames, shared by the `x265` and `nvenc` codecs.

Pure numerics and layout: no video codec here. `pack` turns a (..., tokens, channels)
tensor into 8-bit frames plus side information; `unpack` turns (possibly lossy, HEVC
decoded) frames and that side information back into a tensor. With the frames unchanged,
`unpack(*pack(x))` is exactly the 8-bit quantised reconstruction of x.

Scaling (per channel, like the `cpu` codec, never min/max)
----------------------------------------------------------
Each channel is centred on its median c and scaled by a robust spread s (1.4826 x the
median absolute deviation; where more than half of a channel equals its median, the
mean absolute deviation scaled to a Gaussian sigma, failing that its largest deviation).
One loud token therefore cannot widen its channel's step. The 8-bit code of a value x is

    r = round((x - c) / step),  step = k * s / 127,  code = clamp(r, -127, 127) + 128

so codes 1..255 cover c +- k robust spreads and 128 is the centre. Values with |r| > 127
are outliers: their pixel holds the clamped code (keeps the picture smooth for the video
coder) and their exact float32 value travels beside the stream and overwrites the decoded
one. A constant channel gets step 0: every pixel is 128 and decodes to c exactly, whatever
the video coder does to it. Decoding computes (code - 128) * step + c in float32.

k is `clip_sigma`, lowered to 63.5 / quality at high quality (see `qp_for_quality`), so that
the HEVC quantiser, not the 8-bit rounding, sets the error.

Layout
------
The tensor is read as `items` independent token sequences of `tokens` tokens with
`channels` channels: shape (..., T, C) gives items = prod(...), a 2-D (T, C) tensor one
item, a 1-D (C,) tensor one token. For each (item, channel) the T values form one
*token tile*: a 2-D picture of the token grid.

* Token grid. Image tokens sit on the latent grid (FLUX.2: 64 x 64 at 1024 px), where
  neighbouring tokens are correlated, which is what HEVC intra prediction and its
  transforms exploit. `grid_width` gives the tokens per grid row (the latent width, e.g.
  64), so that vertical neighbours in the picture are vertical neighbours in the image.
  Text tokens are not spatial: `prefix_tokens` (e.g. FLUX.2's 512 text tokens, which come
  first in the joint hidden state) are laid out first, and the image grid starts on a
  fresh row, so text never shears the image rows. Without a `grid_width` (0, the default)
  the grid is near-square: any token count, primes included, becomes a rectangle
  h x w with h * w >= T, both multiples of 8, aspect ratio at most 2, least padding.
  The chosen default is to accept that an unknown grid loses the vertical correlation
  (horizontal neighbours stay neighbours) rather than to guess the grid. The codecs take
  the grid from the TokenLayout hint their caller passes to encode() (n_txt, h, w), and
  for FLUX.2 at 1024 px the automatic grid happens to be the true one (4608 tokens =
  72 rows of 64, 512 text tokens = 8 rows).
* Tile sides are padded to multiples of 8 (HEVC's smallest coding block), so that coding
  blocks can split exactly at tile borders and never mix two channels; padding is the
  centre code 128 (flat, nearly free to code).
* Tiles are laid out row-major on a grid of tiles_y x tiles_x tiles per plane, in the
  order (frame, plane, tile row, tile column), channel-major within an item (tile index
  item * C + channel). The tile grid keeps frames at most 2:1 where it can (x265 and NVENC
  work on rows of 64 px blocks in parallel), then wastes the fewest tile slots. A frame has 3 planes (4:4:4, as NVENC encodes it) or 1 ("gray",
  x265 only). As many frames as needed, each at most 8192 px a side (NVENC's limit) and at
  most 35,651,584 px (HEVC level 6.2's largest picture), at least 144 px a side (NVDEC's
  smallest HEVC picture), both sides multiples of 8 (so even). The tile grid is chosen
  near-square with the fewest empty tiles, tiles spread evenly over the frames.

The layout is a pure function of (shape, planes, grid_width, prefix_tokens): a decoder
recomputes it from the header and refuses frames of any other size. Messages store
grid_width 0 for the automatic grid, so any change to `_auto_grid_width` or to the tile
grid search changes the wire format: bump the codecs' FORMAT_VERSION with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .base import CodecError
from .checks import input_tensor
from .robust import channel_stats, check_values, fallback_spread, setting_int, setting_number

#: Tile sides are multiples of this many pixels (HEVC's minimum coding block).
ALIGN = 8
#: Largest frame side NVENC encodes (and NVDEC decodes on Pascal and later).
MAX_SIDE = 8192
#: Largest picture of HEVC level 6.2 (MaxLumaPs), in pixels.
MAX_AREA = 35_651_584
#: Smallest frame side NVDEC decodes for HEVC; smaller frames are padded up to it.
MIN_SIDE = 144
#: Codes run 128 +- CODE_HALF; beyond that a value is an outlier.
CODE_HALF = 127
#: The centre code (value c).
CODE_CENTER = 128
#: Pixel formats: name -> planes per frame.
PIX_FMTS = {"yuv444p": 3, "gray": 1}

_TINY32 = float(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PackSettings:
    """How `pack` scales and lays out a tensor; the codecs build it from their settings."""

    #: the 8-bit codes cover the channel median +- clip_sigma robust spreads; values
    #: beyond are outliers sent exactly. Unit: robust std.
    clip_sigma: float = 6.0
    #: at most this many evenly spaced tokens estimate each channel's median and spread;
    #: 0 uses every token. Unit: tokens.
    stats_tokens: int = 1024
    #: tokens per row of the token grid (the latent width, e.g. 64 for FLUX.2 at
    #: 1024 px); 0 picks a near-square grid. Unit: tokens.
    grid_width: int = 0
    #: leading non-spatial tokens (text) laid out before the grid, which starts on a
    #: fresh row; 0 when every token is spatial. Unit: tokens.
    prefix_tokens: int = 0
    #: "yuv444p" (3 planes per frame, what NVENC encodes) or "gray" (1 plane).
    pix_fmt: str = "yuv444p"

    def __post_init__(self) -> None:
        sigma = setting_number(self.clip_sigma, "video", "clip_sigma")
        if not (math.isfinite(sigma) and 0 < sigma <= 1e6):
            raise CodecError(f"video codec clip_sigma must be a positive number, got {sigma}")
        for name in ("stats_tokens", "grid_width", "prefix_tokens"):
            if setting_int(getattr(self, name), "video", name) < 0:
                raise CodecError(f"video codec {name} must be >= 0, got {getattr(self, name)}")
        if self.grid_width > MAX_SIDE:
            raise CodecError(f"video codec grid_width {self.grid_width} exceeds the {MAX_SIDE} px frame limit")
        if self.pix_fmt not in PIX_FMTS:
            raise CodecError(f"video codec pix_fmt must be one of {sorted(PIX_FMTS)}, got {self.pix_fmt!r}")
        object.__setattr__(self, "clip_sigma", sigma)


def effective_clip(quality: float, clip_sigma: float) -> float:
    """The 8-bit range k actually used: clip_sigma, narrowed at high quality.

    With k robust spreads over 127 codes, 8-bit rounding alone costs k / (127 sqrt 12)
    spreads of error; keeping k <= 63.5 / quality leaves the HEVC quantiser a step of at
    least ~1.7 codes to work with at the quality asked for.
    """
    return min(clip_sigma, 63.5 / quality)


def qp_for_quality(quality: float, clip: float) -> int:
    """The constant HEVC QP that matches the `cpu` codec's quality scale.

    The cpu codec at quality q has an error of about spread / (q sqrt 12) per value. Here
    a value's error in codes is about sqrt(Qstep^2 + 1) / sqrt 12 (the HEVC quantiser on
    noise-like content, Qstep = 2^((QP - 4) / 6) codes, plus the 8-bit rounding), i.e.
    clip / 127 * sqrt(Qstep^2 + 1) / sqrt 12 spreads. Equal errors give
        Qstep = sqrt((127 / (clip q))^2 - 1),   QP = round(4 + 6 log2 Qstep),
    clamped to HEVC's 0..51. This is a model: content with spatial correlation (image
    tokens on their grid) decodes with less error at the same QP; every message states
    the error it actually has.
    """
    ratio = 127.0 / (clip * quality)
    if ratio <= 1.0:
        return 0
    qstep = math.sqrt(ratio * ratio - 1.0)
    return int(min(51, max(0, round(4 + 6 * math.log2(qstep)))))


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where every value of a tensor sits in the frames; a pure function of its inputs."""

    items: int
    tokens: int
    channels: int
    planes: int
    #: tokens per grid row
    grid_width: int
    #: leading non-spatial tokens (clamped to `tokens`) and the rows they fill
    prefix_tokens: int
    prefix_rows: int
    #: token tile size in pixels (multiples of ALIGN)
    tile_h: int
    tile_w: int
    #: tiles per plane
    tiles_x: int
    tiles_y: int
    frames: int
    #: frame size in pixels
    width: int
    height: int

    @property
    def n_tiles(self) -> int:
        return self.items * self.channels

    @property
    def slots(self) -> int:
        """Tile positions in all frames (>= n_tiles; the rest are padding)."""
        return self.frames * self.planes * self.tiles_y * self.tiles_x

    def segments(self) -> list[tuple[int, int, int]]:
        """(first token, token count, first row) of the prefix and the spatial grid."""
        out = []
        if self.prefix_tokens:
            out.append((0, self.prefix_tokens, 0))
        if self.tokens > self.prefix_tokens:
            out.append((self.prefix_tokens, self.tokens - self.prefix_tokens, self.prefix_rows))
        return out


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """(items, tokens, channels) of a shape: the last dim is channels, the one before it
    tokens, everything before that independent items."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, 1, shape[0]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _grid_rows(tokens: int, prefix: int, width: int) -> tuple[int, int]:
    prefix_rows = _ceil_div(prefix, width)
    return prefix_rows, prefix_rows + _ceil_div(tokens - prefix, width)


def _auto_grid_width(tokens: int, prefix: int) -> int:
    """Near-square grid width (a multiple of ALIGN) with the least padded tile area."""
    base = tokens - prefix if tokens > prefix else tokens
    limit = min(MAX_SIDE, max(ALIGN, _align(2 * math.isqrt(base) + 2)))
    best: tuple | None = None
    for width in range(ALIGN, limit + 1, ALIGN):
        _, rows = _grid_rows(tokens, prefix, width)
        height = _align(rows)
        if height > MAX_SIDE or height * width > MAX_AREA:
            continue
        aspect = max(height, width) / min(height, width)
        key = (aspect > 2.0, height * width, abs(height - width))
        if best is None or key < best[0]:
            best = (key, width)
    if best is None:
        raise CodecError(
            f"video codec: {tokens} tokens do not fit one {MAX_SIDE} px frame; "
            "use the cpu codec for this tensor"
        )
    return best[1]


def plan_layout(shape: Sequence[int], planes: int, grid_width: int = 0, prefix_tokens: int = 0) -> Layout:
    """The frame layout for a tensor of `shape` (see the module docstring)."""
    items, tokens, channels = split_shape(shape)
    prefix = min(prefix_tokens, tokens)
    if items * tokens * channels == 0:
        return Layout(items, tokens, channels, planes, grid_width, prefix, 0, 0, 0, 0, 0, 0, 0, 0)
    width = grid_width or _auto_grid_width(tokens, prefix)
    prefix_rows, rows = _grid_rows(tokens, prefix, width)
    tile_w, tile_h = _align(width), _align(rows)
    if tile_w > MAX_SIDE or tile_h > MAX_SIDE or tile_w * tile_h > MAX_AREA:
        raise CodecError(
            f"video codec: a grid of {width} tokens x {rows} rows ({tokens} tokens) exceeds "
            f"one frame ({MAX_SIDE} px a side, {MAX_AREA} px); choose another grid_width "
            "or use the cpu codec"
        )

    def rows_fitting(tiles_x: int) -> int:
        return min(MAX_SIDE // tile_h, MAX_AREA // (tiles_x * tile_w * tile_h))

    n_tiles = items * channels
    max_x = min(MAX_SIDE // tile_w, n_tiles)
    capacity = max(tx * rows_fitting(tx) for tx in range(1, max_x + 1))
    frames = _ceil_div(n_tiles, planes * capacity)
    per_plane = _ceil_div(n_tiles, planes * frames)
    best: tuple | None = None
    for tx in range(1, min(max_x, per_plane) + 1):
        ty = _ceil_div(per_plane, tx)
        if ty > rows_fitting(tx):
            continue
        frame_w, frame_h = tx * tile_w, ty * tile_h
        key = (max(frame_w, frame_h) > 2 * min(frame_w, frame_h), tx * ty, abs(frame_w - frame_h))
        if best is None or key < best[0]:
            best = (key, tx, ty)
    assert best is not None  # capacity >= per_plane guarantees a fit
    _, tiles_x, tiles_y = best
    return Layout(
        items=items, tokens=tokens, channels=channels, planes=planes,
        grid_width=width, prefix_tokens=prefix, prefix_rows=prefix_rows,
        tile_h=tile_h, tile_w=tile_w, tiles_x=tiles_x, tiles_y=tiles_y, frames=frames,
        width=max(tiles_x * tile_w, MIN_SIDE), height=max(tiles_y * tile_h, MIN_SIDE),
    )


def token_positions(layout: Layout) -> np.ndarray:
    """(row, column) in its tile of every token, int64[T, 2]; for tests and tools."""
    t = np.arange(layout.tokens)
    w = layout.grid_width
    spatial = t >= layout.prefix_tokens
    s = np.where(spatial, t - layout.prefix_tokens, t)
    rows = np.where(spatial, layout.prefix_rows + s // w, s // w)
    return np.stack([rows, s % w], axis=1)


# --------------------------------------------------------------------------- side information


@dataclass(frozen=True)
class PackSide:
    """Everything besides the frames that `unpack` needs."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: Layout
    #: float32[C]: per-channel centre (a median)
    centers: np.ndarray
    #: float32[C]: per-channel step (k * spread / 127); 0 for a constant channel
    steps: np.ndarray
    #: int64[n]: sorted flat indices of the outliers into the original tensor
    outlier_index: np.ndarray
    #: float32[n]: their exact values
    outlier_value: np.ndarray

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_index.size)


# --------------------------------------------------------------------------- pack


def quantise(x: torch.Tensor, settings: PackSettings, clip: float, codec: str = "video"):
    """Codes and side data for x (rows, channels) float32 (modified in place).

    Returns (codes uint8[rows, C], centers, steps, outlier flat indices int64).
    """
    rows, channels = x.shape
    check_values(x, codec)
    centers, spread = channel_stats(x, settings.stats_tokens)
    x.sub_(centers)  # x is now the deviation from the centre
    lo, hi = torch.aminmax(x, dim=0)
    maxdev = torch.maximum(-lo, hi)
    if bool(((spread == 0) & (maxdev > 0)).any()):
        spread = fallback_spread(spread, x.abs(), maxdev)
    steps = torch.where(maxdev > 0, (spread * (clip / CODE_HALF)).clamp_min(_TINY32), torch.zeros(()))
    x.div_(torch.where(steps > 0, steps, torch.ones(()))).round_()
    outlier = (x > CODE_HALF).logical_or_(x < -CODE_HALF)
    codes = x.clamp_(-CODE_HALF, CODE_HALF).add_(CODE_CENTER).to(torch.uint8)
    return codes, centers, steps, outlier.view(-1).nonzero().view(-1)


def pack(tensor: torch.Tensor, settings: PackSettings, clip: float | None = None) -> tuple[list[np.ndarray], PackSide]:
    """Frames (uint8 arrays of shape (planes, height, width), C-contiguous) and side info.

    `clip` is the 8-bit range k in robust spreads (default: settings.clip_sigma).
    """
    t = input_tensor(tensor)
    shape = tuple(t.shape)
    layout = plan_layout(shape, PIX_FMTS[settings.pix_fmt], settings.grid_width, settings.prefix_tokens)
    items, tokens, channels = layout.items, layout.tokens, layout.channels
    if items * tokens * channels == 0:
        empty_f = np.zeros(channels, np.float32)
        side = PackSide(shape, t.dtype, layout, empty_f, empty_f.copy(), np.zeros(0, np.int64), np.zeros(0, np.float32))
        return [], side
    x = t.reshape(items * tokens, channels).to(torch.float32, copy=True)
    codes, centers, steps, outlier_index = quantise(x, settings, settings.clip_sigma if clip is None else clip)
    del x
    outlier_value = t.reshape(-1)[outlier_index].to(torch.float32).numpy()
    frames = _place(codes.view(items, tokens, channels), layout)
    side = PackSide(
        shape=shape, dtype=t.dtype, layout=layout,
        centers=centers.numpy().astype(np.float32), steps=steps.numpy().astype(np.float32),
        outlier_index=outlier_index.numpy().astype(np.int64), outlier_value=outlier_value.astype(np.float32),
    )
    return frames, side


def _slot_view(frames: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(F, P, ty, tx, tile_h, tile_w) view of frames (F, P, H, W)."""
    L = layout
    core = frames[:, :, : L.tiles_y * L.tile_h, : L.tiles_x * L.tile_w]
    core = core.unflatten(3, (L.tiles_x, L.tile_w)).unflatten(2, (L.tiles_y, L.tile_h))
    return core.permute(0, 1, 2, 4, 3, 5)


def _place(codes: torch.Tensor, layout: Layout) -> list[np.ndarray]:
    """Write codes (items, T, C) into freshly allocated frames."""
    L = layout
    by_tile = torch.full((L.slots, L.tokens), CODE_CENTER, dtype=torch.uint8)
    by_tile[: L.n_tiles].view(L.items, L.channels, L.tokens).copy_(codes.permute(0, 2, 1))
    src = by_tile.view(L.frames, L.planes, L.tiles_y, L.tiles_x, L.tokens)
    frames = torch.full((L.frames, L.planes, L.height, L.width), CODE_CENTER, dtype=torch.uint8)
    dst = _slot_view(frames, L)
    w = L.grid_width
    for t0, count, r0 in L.segments():
        full, rem = divmod(count, w)
        if full:
            dst[..., r0 : r0 + full, :w].copy_(src[..., t0 : t0 + full * w].unflatten(-1, (full, w)))
        if rem:
            dst[..., r0 + full, :rem].copy_(src[..., t0 + full * w : t0 + count])
    array = frames.numpy()
    return [array[f] for f in range(L.frames)]


def _gather(frames: Sequence[np.ndarray], layout: Layout) -> torch.Tensor:
    """Codes (items, C, T) uint8 read back out of frames."""
    L = layout
    stack = torch.empty((L.frames, L.planes, L.height, L.width), dtype=torch.uint8)
    for f, frame in enumerate(frames):
        stack[f].copy_(torch.from_numpy(np.ascontiguousarray(frame)).view(L.planes, L.height, L.width))
    src = _slot_view(stack, L)
    by_tile = torch.empty((L.slots, L.tokens), dtype=torch.uint8)
    dst = by_tile.view(L.frames, L.planes, L.tiles_y, L.tiles_x, L.tokens)
    w = L.grid_width
    for t0, count, r0 in L.segments():
        full, rem = divmod(count, w)
        if full:
            # A plain .view, never a silent copy: this is the destination of the copy.
            dst[..., t0 : t0 + full * w].view(*dst.shape[:-1], full, w).copy_(src[..., r0 : r0 + full, :w])
        if rem:
            dst[..., t0 + full * w : t0 + count].copy_(src[..., r0 + full, :rem])
    return by_tile[: L.n_tiles].view(L.items, L.channels, L.tokens)


def check_frames(frames: Sequence[Any], layout: Layout, what: str = "video frames") -> None:
    """The frames are exactly what the layout says; CodecError otherwise."""
    if len(frames) != layout.frames:
        raise CodecError(
            f"{what}: got {len(frames)} frames, the header's layout needs {layout.frames}: "
            "the stream is damaged or was written by another layout"
        )
    want = (layout.planes, layout.height, layout.width)
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != want:
            got = (getattr(frame, "shape", None), getattr(frame, "dtype", None))
            raise CodecError(
                f"{what}: frame {i} is {got}, expected uint8 {want}: "
                "the stream does not match its header"
            )


def dequantise(frames: Sequence[np.ndarray], side: PackSide) -> torch.Tensor:
    """The float32 reconstruction (items * T, C): (code - 128) * step + c, outliers exact."""
    L = side.layout
    check_frames(frames, L)
    if L.items * L.tokens * L.channels == 0:
        return torch.zeros((L.items * L.tokens, L.channels), dtype=torch.float32)
    codes = _gather(frames, L)
    y = torch.empty((L.items, L.tokens, L.channels), dtype=torch.float32)
    # Transposing while converting: the uint8 -> float32 copy reads the codes strided.
    y.copy_(codes.permute(0, 2, 1))
    y.sub_(CODE_CENTER).mul_(torch.from_numpy(side.steps)).add_(torch.from_numpy(side.centers))
    y = y.view(L.items * L.tokens, L.channels)
    if side.outlier_index.size:
        y.view(-1)[torch.from_numpy(side.outlier_index)] = torch.from_numpy(side.outlier_value)
    return y


def cast_output(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> the original dtype; clamping to its range never adds error (the
    original value was inside it)."""
    if dtype == torch.float32:
        return y
    limit = float(torch.finfo(dtype).max)
    return y.clamp_(-limit, limit).to(dtype)


def unpack(frames: Sequence[np.ndarray], side: PackSide) -> torch.Tensor:
    """The tensor (original shape and dtype) from frames and side information."""
    return cast_output(dequantise(frames, side), side.dtype).reshape(side.shape)


__all__ = [
    "ALIGN", "MAX_SIDE", "MAX_AREA", "MIN_SIDE", "PIX_FMTS",
    "Layout", "PackSettings", "PackSide", "cast_output", "check_frames", "dequantise",
    "effective_clip", "pack", "plan_layout", "qp_for_quality", "split_shape", "token_positions", "unpack",
]
