"""Where the `gpu` codec's coefficients come from and go, shared by its two backends.

A (B, T, C) carry becomes rows of C coefficients (channels innermost), in this order:

    text rows   B * n_txt          tokens as they are (every token when there is no grid)
    block rows  B * hb * wb * 64   an orthonormal 8x8 DCT per channel over the image grid
                                   (replicate-padded to multiples of 8); rows u*8+v
    loud rows   len(loud)          high-norm image tokens, coded outside the transform

Loud rows come last so that the other rows' positions do not depend on how many there
are: the fused encoder finds them on the GPU and only learns their count at the end.

Each row has a class: the DCT band of its frequency (0..4, by u + v), text, or loud.
A symbol's context table is `bucket[class, channel]`.

The step sizes, one global and one per channel (a quiet channel's may be finer), are
bfloat16 values (8 significant bits): then q * step is exact in float32 for every
|q| < 2^15, so the reconstruction, and the temporal reference built from it, is the same
bits on every device and with or without fused multiply-adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import TokenLayout

BLOCK = 8  # DCT block side, tokens
ROWS_PER_BLOCK = BLOCK * BLOCK
N_BUCKETS = 32  # context tables
BUCKET_OFFSET = 10  # bucket = round(2 log2(rms / step)) + offset
N_BANDS = 5  # classes 0..4: DCT frequency bands by u + v
TEXT_CLASS = 5
LOUD_CLASS = 6
N_CLASSES = 7
LOUD_FACTOR = 4.0  # image tokens this many times the median centred token norm are loud
MAX_LOUD_FRACTION = 1 / 64  # at most this share of image tokens
FINEST_STEP = 2.0 ** -15  # per-channel steps go down to the global step times this
STATS_ROWS = 256  # tokens sampled for each channel's median centre and spread
# Byte alignment of each part of a message in memory: typed views need it, and Triton
# compiles a kernel variant per pointer alignment (16 or not), so parts at 8-byte
# offsets compiled again for messages whose parts fell differently.
ALIGN = 16


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def band_of_frequency(u_plus_v: int) -> int:
    """Band of DCT frequency (u, v) by u + v: 0 | 1-2 | 3-5 | 6-9 | 10-14."""
    return (u_plus_v >= 1) + (u_plus_v >= 3) + (u_plus_v >= 6) + (u_plus_v >= 10)


@dataclass(frozen=True)
class Layout:
    batch: int
    tokens: int
    channels: int
    n_txt: int  # untransformed tokens per batch item (all tokens without a grid)
    h: int
    w: int  # image grid (0 x 0 without)
    loud: tuple = ()  # flat (batch * h * w) indices of loud image tokens, ascending

    @property
    def hb(self) -> int:
        return -(-self.h // BLOCK)

    @property
    def wb(self) -> int:
        return -(-self.w // BLOCK)

    @property
    def text_rows(self) -> int:
        return self.batch * self.n_txt

    @property
    def block_rows(self) -> int:
        return self.batch * self.hb * self.wb * ROWS_PER_BLOCK if self.h else 0

    @property
    def fixed_rows(self) -> int:
        """Rows before the loud ones."""
        return self.text_rows + self.block_rows

    @property
    def rows(self) -> int:
        return self.fixed_rows + len(self.loud)

    @property
    def n_coef(self) -> int:
        return self.rows * self.channels

    @property
    def image_tokens(self) -> int:
        return self.batch * self.h * self.w

    @property
    def loud_capacity(self) -> int:
        return max(1, int(self.image_tokens * MAX_LOUD_FRACTION)) if self.h else 0

    def same_shape(self, other: "Layout | None") -> bool:
        return other is not None and (self.batch, self.tokens, self.channels, self.n_txt, self.h, self.w) == (
            other.batch, other.tokens, other.channels, other.n_txt, other.h, other.w)


def make_layout(shape: tuple[int, ...], hint: TokenLayout | None, use_grid: bool = True) -> Layout:
    channels = shape[-1] if shape else 1
    tokens = shape[-2] if len(shape) >= 2 else 1
    batch = math.prod(shape[:-2]) if len(shape) > 2 else 1
    if use_grid and hint is not None and hint.tokens == tokens and hint.h > 0 and hint.w > 0 and hint.n_txt >= 0:
        return Layout(batch, tokens, channels, hint.n_txt, hint.h, hint.w)
    return Layout(batch, tokens, channels, tokens, 0, 0)


# ---------------------------------------------------------------- transform


def dct_matrix(n: int = BLOCK, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are frequencies), float32."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.to(torch.float32).to(device)


# The temporal reference both ends keep (the last reconstruction's coefficients): bf16.
# Both round the same float32 sums, so they keep the same reference; a delta then codes
# the rounding too (at most 2^-9 of a coefficient), which on the corpus (rho 0.9, six
# steps) changed the ratio in the fourth digit, and it halves what the reference costs:
# in GPU memory, and in the kernels that read and write it every message.
REF_DTYPE = torch.bfloat16


def dct2_matrix(device=None) -> torch.Tensor:
    """(64, 64): block-frequency row u*8+v from token row i*8+j of one 8x8 block."""
    d = dct_matrix(device=None).double()
    return torch.kron(d, d).to(torch.float32).to(device)


def dct2_bf16_pieces(device=None) -> torch.Tensor:
    """(3, 64, 64) bf16: dct2_matrix as three bf16 matrices that add up to it, largest
    first (each the bf16 rounding of what the ones before leave): with a bf16 input, whose
    products with bf16 values are exact in float32, the sum of the three tensor-core
    products is about as accurate as one in float32 (the float32 matrix, kept whole)."""
    pieces, left = [], dct2_matrix().double()
    for _ in range(3):
        pieces.append(left.to(torch.bfloat16))
        left = left - pieces[-1].double()
    return torch.stack(pieces).to(device)


def dct2_piece_sums(device=None) -> torch.Tensor:
    """(3, 64) float32: row k of the first 1, 2 and 3 dct2_bf16_pieces added up, summed
    along the row. The products take the carry uncentred (it is bf16; centred it need
    not be), and subtract centre x these sums: the same as centring first, exactly."""
    partial = dct2_bf16_pieces().double().cumsum(0)
    return partial.sum(-1).to(torch.float32).to(device)


def band_of_rows(device=None) -> torch.Tensor:
    """(64,) band class of each block row u*8+v."""
    return torch.tensor([band_of_frequency(r // BLOCK + r % BLOCK) for r in range(ROWS_PER_BLOCK)],
                        dtype=torch.int64, device=device)


def row_classes(layout: Layout, device=None, band: torch.Tensor | None = None) -> torch.Tensor:
    """Class of every row, in row order. `band`: band_of_rows made beforehand (on
    `device`), for callers that must not upload (inside a CUDA graph capture)."""
    blocks = layout.block_rows // ROWS_PER_BLOCK
    band = band_of_rows(device) if band is None else band
    return torch.cat([torch.full((layout.text_rows,), TEXT_CLASS, dtype=torch.int64, device=device),
                      band.repeat(blocks),
                      torch.full((len(layout.loud),), LOUD_CLASS, dtype=torch.int64, device=device)])


def symbol_contexts(layout: Layout, buckets: torch.Tensor) -> torch.Tensor:
    """(n_coef,) context table of every coefficient: bucket[class of its row, channel]."""
    cls = row_classes(layout, buckets.device)
    return buckets.to(torch.int64)[cls].reshape(-1)


def forward(centred: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reference transform: centred (B, T, C) -> flat coefficients in row order. Loud
    tokens leave the grid (zero, the centre, takes their place) and get rows of their own."""
    p = layout
    text = centred[:, : p.n_txt].reshape(-1)
    if not p.h:
        return text
    img = centred[:, p.n_txt:].reshape(p.image_tokens, p.channels)
    loud = torch.tensor(p.loud, dtype=torch.int64, device=centred.device)
    loud_values = img[loud]
    if p.loud:
        img = img.clone()
        img[loud] = 0.0
    img = img.reshape(p.batch, p.h, p.w, p.channels).permute(0, 3, 1, 2)
    img = torch.nn.functional.pad(img, (0, p.wb * BLOCK - p.w, 0, p.hb * BLOCK - p.h), mode="replicate")
    img = img.reshape(p.batch, p.channels, p.hb, BLOCK, p.wb, BLOCK)
    d = dct_matrix(device=centred.device)
    coef = torch.einsum("ui,bchiwj,vj->bhwuvc", d, img, d)
    return torch.cat([text, coef.reshape(-1), loud_values.reshape(-1)])


def inverse(coef: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reference inverse of `forward`: flat coefficients -> centred (B, T, C)."""
    p = layout
    n_text = p.text_rows * p.channels
    text = coef[:n_text].reshape(p.batch, p.n_txt, p.channels)
    if not p.h:
        return text
    n_blocks = p.block_rows * p.channels
    c = coef[n_text:n_text + n_blocks].reshape(p.batch, p.hb, p.wb, BLOCK, BLOCK, p.channels)
    d = dct_matrix(device=coef.device)
    img = torch.einsum("ui,bhwuvc,vj->bhiwjc", d, c, d).reshape(p.batch, p.hb * BLOCK, p.wb * BLOCK, p.channels)
    img = img[:, : p.h, : p.w].reshape(p.image_tokens, p.channels)
    if p.loud:
        img[torch.tensor(p.loud, dtype=torch.int64, device=coef.device)] = \
            coef[n_text + n_blocks:].reshape(len(p.loud), p.channels)
    return torch.cat([text, img.reshape(p.batch, p.h * p.w, p.channels)], dim=1)


# ---------------------------------------------------------------- statistics


def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """At most STATS_ROWS evenly spaced tokens of (B, T, C) as float32 rows: medians over
    them are as good for a centre and a spread (both are sent, not recomputed), and the
    sort costs time (4608 rows: 13 ms on a GPU; 512: 0.14 ms)."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if n > STATS_ROWS:  # integer spacing (torch.linspace on a GPU cost 2.4 ms of host time)
        idx = torch.arange(STATS_ROWS, device=flat.device) * (n - 1) // (STATS_ROWS - 1)
        flat = flat.index_select(0, idx)
    return flat.float()


def column_medians(rows: torch.Tensor) -> torch.Tensor:
    """torch.median(dim=0), the lower median, by a sort along contiguous rows (on an H200,
    for 512 x 6144: median(dim=0) 0.24 ms, kthvalue 0.18 ms, this 0.14 ms; the fused
    backend has its own kernel)."""
    return rows.t().contiguous().sort(dim=-1).values[:, (rows.shape[0] - 1) // 2]


def channel_centre(rows: torch.Tensor) -> torch.Tensor:
    """Median of each channel, rounded to bf16 so both ends subtract the same value."""
    return column_medians(rows).to(torch.bfloat16).float()


def channel_spread(centred_rows: torch.Tensor) -> torch.Tensor:
    """Robust spread of each channel (1.4826 x median absolute deviation), (C,)."""
    mad = 1.4826 * column_medians(centred_rows.abs())
    # A channel whose values mostly sit on one bf16 value (a massive channel on a large
    # offset) has MAD 0 though it varies: fall back to its RMS deviation.
    return torch.where(mad > 0, mad, centred_rows.pow(2).mean(dim=0).sqrt())


def find_loud(token_sq: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Loud image tokens from each image token's centred squared norm, on the device.

    -> (indices, count): `loud_capacity` flat image-token indices, the loud ones first
    and ascending, the rest -1; `count` a 0-d tensor. No host round trip.
    """
    cap = layout.loud_capacity
    limit = (LOUD_FACTOR ** 2) * token_sq.median()
    top = torch.topk(token_sq, min(cap, token_sq.numel()))
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(top.values > limit, top.indices, torch.full_like(top.indices, big))
    ordered = keyed.sort().values
    count = (ordered != big).sum()
    idx = torch.full((cap,), -1, dtype=torch.int64, device=token_sq.device)
    idx[: ordered.numel()] = torch.where(ordered != big, ordered, torch.full_like(ordered, -1))
    return idx, count


def round_step(step: torch.Tensor) -> torch.Tensor:
    """Step sizes as bf16 values (see the module doc: q * step stays exact)."""
    return step.to(torch.bfloat16).float()


def channel_floors(spread: torch.Tensor, floor: float) -> torch.Tensor:
    """Per channel the coarsest step its own `channel_rel_err` allows (`floor` x its spread),
    rounded down to a bf16 value (see the module doc); +inf where nothing limits it.

    Format 4 refined the global step by powers of two, to between half and all of this:
    on average 1.4 times finer than a channel asked, bits spent on every quiet channel
    (most of them, next to the step, at a loose rel_err). On the corpus (6144 channels,
    torch backend), against format 4 at its channel_rel_err of 0.25, this at 0.2 gave
    0.8 / 1.7 / 4.1 / 7.9 % more ratio at rel_err 0.02 / 0.03 / 0.05 / 0.1, and the worst
    channel fares better (768 channels: cosine 0.952 against 0.928). (C,) float32."""
    bound = (floor * spread.float()).contiguous()
    down = (bound.view(torch.int32) & -65536).view(torch.float32)  # bf16 truncation: <= bound
    return torch.where((spread > 0) & (floor > 0), down, torch.full_like(down, math.inf))


def bf16_as_float32(buffer) -> np.ndarray:
    """A message's bf16 values (bytes) as float32, exactly, on the host."""
    return (np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def channel_steps(step: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """Each channel's step for a global `step` ((...,), bf16 values): the global one, or
    its floor where that is finer, but no finer than FINEST_STEP of it (a near-constant
    channel would otherwise send every value as an escape). bf16 values. -> (..., C)"""
    step = step[..., None]
    return torch.minimum(step, torch.maximum(floors, step * FINEST_STEP))


#: the most weight a delta message puts on the stream's reference
PRED_MAX = 1.5


def prediction_weight(cross: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    """A delta message's weight on the reference: the least-squares fit of the centred
    coefficients on the reference's (`cross` = their dot product, `ref_sq` = the
    reference's sum of squares), as weighted prediction in video codecs. Consecutive steps
    correlate at rho < 1, so the best prediction is rho times the last, not the last: on
    the corpus at rho 0.9 (6144 channels, rel_err 0.03) a delta at weight 1 was 1.46x a
    key message, at the fitted weight (0.91) 1.51x. In [0, PRED_MAX], 1 where there is
    nothing to fit, rounded to bf16: a bf16 weight times a bf16 reference is exact in
    float32, so every kernel and both ends compute the same new reference whether or not
    a multiply and an add are fused. -> float32 scalar tensor."""
    fitted = torch.where(ref_sq > 0, cross / torch.where(ref_sq > 0, ref_sq, 1), 1.0)
    fitted = torch.where(torch.isfinite(fitted), fitted, 1.0).clamp(0.0, PRED_MAX)
    return fitted.to(torch.bfloat16).to(torch.float32)


def context_buckets(sq: torch.Tensor, rows: torch.Tensor, steps_c: torch.Tensor) -> torch.Tensor:
    """(N_CLASSES, C) context table per (class, channel), from the RMS of its coefficients
    (`sq` their sum of squares over `rows` rows, (N_CLASSES, C) or (N_CLASSES, 1)) in units
    of that channel's step: each rANS table codes a similar distribution."""
    rms = (sq / rows.clamp(min=1)).sqrt()
    bucket = (2 * torch.log2(rms / steps_c + 1e-30)).round().add(BUCKET_OFFSET).clamp(0, N_BUCKETS - 1)
    return bucket.to(torch.uint8)
