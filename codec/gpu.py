"""The `gpu` codec: transform, uniform quantisation and context-modelled rANS, on-device.

For cards without NVENC (H100, H200, AMD, CPU). Every stage runs where the tensor is, in
torch ops; the only host transfer is the final bytes (one copy each way).

Pipeline (encode):

1. centre each channel on its median (robust: loud tokens do not move it), rounded to
   bf16 so both ends subtract the same value;
2. transform: image tokens on their grid (when a TokenLayout says where they are) get
   an orthonormal 8x8 DCT per channel, which gathers the spatial redundancy of DiT
   activations into few coefficients; text tokens are left as they are;
3. quantise every coefficient with ONE step size. For a target on the relative L2 error
   of the whole tensor this is the rate-optimal choice (reverse water-filling): quiet
   channels and bands fall to zero and cost almost nothing, loud ones get the levels;
   per-channel scaling would spend bits on channels the error metric barely sees. The
   step comes from the target: step = rel_err * ||x|| * sqrt(12 / N);
4. entropy-code the integers (codec/entropy.py): one rANS table per context, the
   context being the log-spread of the coefficient's (channel, frequency band) cell,
   so each table fits the distribution it codes; values too large for the token set
   (one loud token in a massive channel) travel exactly.

Temporal mode: with a StreamState, a message after the first codes the change from the
previous reconstruction (kept in coefficient space, updated by element-wise float ops
that give the same bits on every device), so correlated sampler steps cost a fraction.
A delta that does not fit the receiver's state raises CodecStateError; the sender then
resets and sends a key message.

Error: every coefficient is off by at most step/2 (escapes are exact), the transform
is orthonormal, so ||error|| <= step/2 * sqrt(N) — the header states this bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .base import CodecError, CodecStateError, EncodedTensor, StreamState, TokenLayout
from .checks import check_codec_and_version, dtype_name, header_dtype, header_field, header_shape, message_parts
from . import entropy, entropy_triton
from .entropy import ALPHABET, ESCAPE, Geometry, RansStreams, detokenize, normalize_counts, tokenize

FORMAT_VERSION = 1
BLOCK = 8  # DCT block side, tokens
N_BUCKETS = 32  # context tables
BUCKET_OFFSET = 10  # bucket = round(2 log2(spread / step)) + offset
TEXT_CLASS = 5  # band classes 0..4 are DCT frequency bands (by u + v), 5 text tokens, 6 loud tokens
LOUD_CLASS = 6
N_CLASSES = 7
LOUD_FACTOR = 4.0  # image tokens this many times the median token norm skip the transform
MAX_LOUD_FRACTION = 1 / 64  # at most this share of image tokens
FIT_ITERATIONS = 5  # passes that fit the step size to the error target
MAX_SHIFT = 15  # per-channel steps go down to step / 2^15
STATS_ROWS = 512  # tokens sampled for each channel's median centre and spread
_BAND_OF_SUM = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4]


@dataclass(frozen=True)
class GpuSettings:
    """Encoder settings; decoding needs none."""

    #: target relative L2 error of the whole tensor; the step size follows from it.
    #: Unit: ||error|| / ||x||. The header states a hard bound (about 1.7x this).
    rel_err: float = 0.03
    #: the most relative error any one channel may get (its own RMS error over its robust
    #: spread, about): the step is refined for quiet channels that one global step would
    #: zero out. 0 turns this off (pure rate-optimal allocation). Unit: ratio.
    channel_rel_err: float = 0.25
    #: use the grid of image tokens (from the TokenLayout hint) for an 8x8 DCT.
    transform: bool = True
    #: code the change from the previous message when a StreamState is given.
    temporal: bool = True
    #: rANS lanes per group, and at least / at most this many steps per lane (the
    #: encoder picks; the header records it). More steps: smaller final-state overhead
    #: (4 bytes a lane); fewer: more parallel work. None picks per device: 1024 on a GPU
    #: (one fused kernel runs the steps), 256 on a CPU (one batch of torch ops per step).
    lanes: int = 64
    min_steps: int | None = None
    max_steps: int = 4096

    def __post_init__(self):
        if not (isinstance(self.rel_err, (int, float)) and 0 < self.rel_err < 1):
            raise CodecError(f"gpu codec rel_err must be in (0, 1), got {self.rel_err!r}")
        if not (isinstance(self.lanes, int) and 1 <= self.lanes <= 4096):
            raise CodecError(f"gpu codec lanes must be an int in [1, 4096], got {self.lanes!r}")
        if not (isinstance(self.max_steps, int) and (self.min_steps is None or isinstance(self.min_steps, int))
                and 1 <= (self.min_steps or 1) <= self.max_steps <= 65536):
            raise CodecError(f"gpu codec steps need 1 <= min_steps <= max_steps <= 65536, got "
                             f"{self.min_steps!r}, {self.max_steps!r}")


def dct_matrix(n: int = BLOCK, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are frequencies), float32."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.to(torch.float32).to(device)


def _band_classes(device) -> torch.Tensor:
    u = torch.arange(BLOCK)
    return torch.tensor(_BAND_OF_SUM, device=device)[(u[:, None] + u[None, :]).reshape(-1).to(device)]


@dataclass(frozen=True)
class _Plan:
    """Where a (B, T, C) tensor's coefficients come from and go.

    Coefficient order, channels innermost: text tokens | loud image tokens | DCT blocks.
    """

    batch: int
    tokens: int
    channels: int
    n_txt: int  # untransformed tokens (all tokens without a grid)
    h: int
    w: int  # image grid (0 x 0 without)
    loud: tuple = ()  # flat (batch * h * w) indices of image tokens coded outside the transform

    @property
    def hp(self) -> int:
        return -(-self.h // BLOCK) * BLOCK

    @property
    def wp(self) -> int:
        return -(-self.w // BLOCK) * BLOCK

    @property
    def n_coef(self) -> int:
        return (self.batch * (self.n_txt + self.hp * self.wp) + len(self.loud)) * self.channels

    def same_shape(self, other: "_Plan | None") -> bool:
        return other is not None and (self.batch, self.tokens, self.channels, self.n_txt, self.h, self.w) == (
            other.batch, other.tokens, other.channels, other.n_txt, other.h, other.w)


def _plan(shape: tuple[int, ...], layout: TokenLayout | None, use_grid: bool) -> _Plan:
    channels = shape[-1] if shape else 1
    tokens = shape[-2] if len(shape) >= 2 else 1
    batch = math.prod(shape[:-2]) if len(shape) > 2 else 1
    if use_grid and layout is not None and layout.tokens == tokens and layout.h > 0 and layout.w > 0:
        return _Plan(batch, tokens, channels, layout.n_txt, layout.h, layout.w)
    return _Plan(batch, tokens, channels, tokens, 0, 0)


def _find_loud(centered: torch.Tensor, p: _Plan) -> tuple:
    """Image tokens whose norm is far above the typical one (attention-sink-like tokens).

    Inside an 8x8 DCT block one such token spreads its energy over all 64 coefficients
    and inflates its cells' statistics; coded on their own they cost their own bits only.
    """
    if not p.h:
        return ()
    norms = centered[:, p.n_txt:].reshape(p.batch * p.h * p.w, p.channels).norm(dim=1)
    limit = LOUD_FACTOR * norms.median()
    cap = max(1, int(norms.numel() * MAX_LOUD_FRACTION))
    top = torch.topk(norms, min(cap, norms.numel()))
    return tuple(sorted(top.indices[top.values > limit].tolist()))


def _forward(x: torch.Tensor, p: _Plan, d: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> flat coefficients in the plan's order. Loud tokens leave the grid,
    where `fill` (per channel; None for zero) takes their place."""
    text = x[:, : p.n_txt]
    if not p.h:
        return text.reshape(-1)
    img = x[:, p.n_txt:].reshape(p.batch * p.h * p.w, p.channels)
    loud = torch.tensor(p.loud, dtype=torch.int64, device=x.device)
    loud_values = img[loud]
    if p.loud:
        img = img.clone()
        img[loud] = 0.0 if fill is None else fill
    img = img.reshape(p.batch, p.h, p.w, p.channels).permute(0, 3, 1, 2)
    img = torch.nn.functional.pad(img, (0, p.wp - p.w, 0, p.hp - p.h), mode="replicate")
    img = img.reshape(p.batch, p.channels, p.hp // BLOCK, BLOCK, p.wp // BLOCK, BLOCK)
    coef = torch.einsum("ui,bchiwj,vj->bhwuvc", d, img, d)
    return torch.cat([text.reshape(-1), loud_values.reshape(-1), coef.reshape(-1)])


def _inverse(coef: torch.Tensor, p: _Plan, d: torch.Tensor) -> torch.Tensor:
    n_text = p.batch * p.n_txt * p.channels
    text = coef[:n_text].reshape(p.batch, p.n_txt, p.channels)
    if not p.h:
        return text
    n_loud = len(p.loud) * p.channels
    loud_values = coef[n_text:n_text + n_loud].reshape(len(p.loud), p.channels)
    hb, wb = p.hp // BLOCK, p.wp // BLOCK
    c = coef[n_text + n_loud:].reshape(p.batch, hb, wb, BLOCK, BLOCK, p.channels)
    img = torch.einsum("ui,bhwuvc,vj->bhiwjc", d, c, d).reshape(p.batch, p.hp, p.wp, p.channels)
    img = img[:, : p.h, : p.w].reshape(p.batch * p.h * p.w, p.channels)
    if p.loud:
        img[torch.tensor(p.loud, dtype=torch.int64, device=coef.device)] = loud_values
    return torch.cat([text, img.reshape(p.batch, p.h * p.w, p.channels)], dim=1)


def _row_classes(p: _Plan, device) -> torch.Tensor:
    """Band class of every row of C coefficients (channels are innermost), in plan order."""
    text = torch.full((p.batch * p.n_txt,), TEXT_CLASS, dtype=torch.int64, device=device)
    if not p.h:
        return text
    loud = torch.full((len(p.loud),), LOUD_CLASS, dtype=torch.int64, device=device)
    blocks = (p.hp // BLOCK) * (p.wp // BLOCK)
    img = _band_classes(device)[None, None, :].expand(p.batch, blocks, BLOCK * BLOCK)
    return torch.cat([text, loud, img.reshape(-1)])


def _rows_for_stats(flat: torch.Tensor) -> torch.Tensor:
    """At most STATS_ROWS evenly spaced tokens: medians over them are as good for a centre
    and a spread (both are sent, not recomputed) and a sort of 4608 rows costs 13 ms."""
    if flat.shape[0] <= STATS_ROWS:
        return flat
    idx = torch.linspace(0, flat.shape[0] - 1, STATS_ROWS, device=flat.device).round().long()
    return flat[idx]


def _channel_spread(centered: torch.Tensor) -> torch.Tensor:
    """Robust spread of each channel (1.4826 x median absolute deviation), (C,)."""
    flat = _rows_for_stats(centered.reshape(-1, centered.shape[-1]))
    mad = 1.4826 * flat.abs().median(dim=0).values
    # A channel whose values mostly sit on one bf16 value (a massive channel on a large
    # offset) has MAD 0 though it varies: fall back to its RMS deviation.
    return torch.where(mad > 0, mad, flat.pow(2).mean(dim=0).sqrt())


def _channel_shifts(step: float, spread: torch.Tensor, floor: float) -> torch.Tensor:
    """Per channel k >= 0 such that step / 2^k <= floor * spread: no channel is coded coarser
    than its own `channel_rel_err` allows, however quiet it is next to the loud ones."""
    if floor <= 0:
        return torch.zeros_like(spread, dtype=torch.int64)
    ratio = step / (floor * spread.clamp(min=1e-30))
    k = torch.ceil(torch.log2(ratio.clamp(min=1.0)))
    return torch.where(spread > 0, k, torch.zeros_like(k)).clamp(0, MAX_SHIFT).to(torch.int64)


def _steps(step: float, shifts: torch.Tensor) -> torch.Tensor:
    """Per-channel step sizes: step / 2^shift, exact in float32 on every device."""
    return torch.tensor(step, dtype=torch.float32, device=shifts.device) * torch.pow(2.0, -shifts.float())


def _expand_center(center: torch.Tensor, p: _Plan) -> torch.Tensor:
    """Coefficients of a per-channel constant: the value on text and loud tokens, 8x it
    on each block's DC (orthonormal 2-D DCT of a constant). Element-wise, so exact."""
    text = center.expand(p.batch, p.n_txt, p.channels).reshape(-1)
    if not p.h:
        return text
    loud = center.expand(len(p.loud), p.channels).reshape(-1)
    blocks = (p.hp // BLOCK) * (p.wp // BLOCK)
    img = torch.zeros(p.batch, blocks, BLOCK * BLOCK, p.channels, device=center.device)
    img[:, :, 0, :] = center * BLOCK
    return torch.cat([text, loud, img.reshape(-1)])


def _to_bytes(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate tensors' bytes on their device; one host copy of the result, into
    pinned memory from a GPU (a pageable copy of 8 MB measured 3.8 ms on an H200)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    sizes = [f.numel() for f in flat]
    blob = torch.cat(flat)
    if not blob.is_cuda:
        return blob, sizes
    host = torch.empty(blob.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(blob)
    return host, sizes


def _from_bytes(buffers: list, total: int, device: torch.device) -> torch.Tensor:
    """The received buffers as one tensor on `device`: one host copy (into pinned memory
    for a GPU), one upload. Received buffers are read-only, so this copy is owed anyway."""
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    view, pos = host.numpy(), 0
    for b in buffers:
        n = memoryview(b).nbytes
        view[pos:pos + n] = np.frombuffer(b, dtype=np.uint8)
        pos += n
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


class GpuCodec:
    name = "gpu"
    Settings = GpuSettings

    def __init__(self, settings: GpuSettings | None = None):
        self.settings = settings or GpuSettings()

    # ---------------------------------------------------------------- encode

    def encode(self, tensor: torch.Tensor, *, state: StreamState | None = None,
               layout: TokenLayout | None = None) -> EncodedTensor:
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"codecs encode torch tensors, not {type(tensor).__name__}")
        dtype = dtype_name(tensor.dtype)
        s = self.settings
        shape = tuple(tensor.shape)
        p = _plan(shape, layout, s.transform)
        device = tensor.device
        x = tensor.detach().reshape(p.batch, p.tokens, p.channels).float()
        if not torch.isfinite(x).all():
            raise CodecError("cannot encode NaN or Inf values; send this tensor with the raw codec")
        d = dct_matrix(device=device)
        temporal = s.temporal and state is not None
        delta = temporal and state.reference is not None and p.same_shape(state.signature)

        if delta:
            p = state.signature  # keep the reference's loud tokens, so the delta lines up
            center = None
            coef = _forward(x, p, d, state.reference["fill"]) - state.reference["coef"]
        else:
            center = _rows_for_stats(x.reshape(-1, p.channels)).median(dim=0).values.to(torch.bfloat16).float()
            centered = x - center
            p = replace(p, loud=_find_loud(centered, p))
            coef = _forward(centered, p, d, None)
        norm = float(x.norm())
        spread = _channel_spread(x - (center if center is not None else
                                      _rows_for_stats(x.reshape(-1, p.channels)).median(0).values))
        floor = s.channel_rel_err * math.sqrt(12.0)
        coef2d = coef.view(-1, p.channels)
        step, shifts = _fit_step(coef2d, spread, floor, s.rel_err * norm, p.batch * p.tokens * p.channels)
        steps_c = _steps(step, shifts)
        q = torch.round(coef2d / steps_c).to(torch.int64).reshape(-1)
        token, n_raw, raw = tokenize(q)

        # Contexts: one bucket per (band class, channel), from the RMS of its coefficients
        # in units of that channel's step: each rANS table codes a similar distribution.
        row_cls = _row_classes(p, device)
        sq = torch.zeros(N_CLASSES, p.channels, device=device).index_add_(0, row_cls, coef2d * coef2d)
        cnt = torch.bincount(row_cls, minlength=N_CLASSES).clamp(min=1)[:, None]
        rms = (sq / cnt).sqrt()
        bucket = (2 * torch.log2(rms / steps_c + 1e-30)).round().add(BUCKET_OFFSET).clamp(0, N_BUCKETS - 1)
        bucket = bucket.to(torch.uint8)
        ctx = bucket.to(torch.int64)[row_cls].reshape(-1)
        # bincount, not index_put_(accumulate=True): on CUDA the latter sorts (0.6 s for 28 M symbols)
        counts = torch.bincount(ctx * ALPHABET + token, minlength=N_BUCKETS * ALPHABET).view(N_BUCKETS, ALPHABET)
        freq = normalize_counts(counts)
        min_steps = s.min_steps or (1024 if device.type == "cuda" else 256)
        geo = Geometry.for_count(token.numel(), s.lanes, min(min_steps, s.max_steps), s.max_steps)
        streams = _rans(device).rans_encode(token, n_raw, raw, ctx, freq, geo)

        escaped = torch.nonzero(token == ESCAPE).flatten()
        esc_values = coef[escaped]
        if temporal:
            recon = (q.view(-1, p.channels).float() * steps_c).reshape(-1)
            recon[escaped] = esc_values
            base = state.reference["coef"] if delta else _expand_center(center, p)
            fill = state.reference["fill"] if delta else center
            state.reference = {"coef": base + recon, "fill": fill}
            state.signature = p
            ref_seq = state.seq
            state.seq += 1
        names = ["shifts", "buckets", "freq", "group_words", "states", "words", "esc_pos", "esc_val"]
        used = torch.nonzero(freq.sum(-1) > 0).flatten()
        payload = [shifts.to(torch.uint8), bucket, freq[used].to(torch.int16), streams.group_words.to(torch.int32),
                   _as_u32(streams.states), _as_u16(streams.words),
                   escaped.to(torch.int64), esc_values.float()]
        if center is not None:
            payload.insert(0, center.to(torch.bfloat16))
            names.insert(0, "center")
        blob, sizes = _to_bytes(payload)
        numel = p.batch * p.tokens * p.channels
        bound = (step / 2 * math.sqrt(p.n_coef) / norm if norm > 0 else 0.0) + 1e-5
        if tensor.dtype in (torch.bfloat16, torch.float16):
            bound += (2.0 ** -8 if tensor.dtype == torch.bfloat16 else 2.0 ** -11) * (1 + bound)
        header = {
            "codec": self.name, "v": FORMAT_VERSION, "shape": list(shape), "dtype": dtype,
            "grid": [p.n_txt, p.h, p.w], "loud": list(p.loud), "step": step, "n": numel,
            "rans": [geo.lanes, geo.steps, geo.groups], "parts": dict(zip(names, sizes)),
            "n_esc": int(escaped.numel()), "tables": used.tolist(), "rel_err_bound": bound,
        }
        if temporal:
            header["stream"] = {"seq": ref_seq + 1, "delta": bool(delta), "ref": ref_seq if delta else None}
        view = memoryview(blob.numpy())
        buffers, pos = [], 0
        for size in sizes:
            buffers.append(view[pos:pos + size])
            pos += size
        return EncodedTensor(header, buffers)

    # ---------------------------------------------------------------- decode

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *,
               state: StreamState | None = None) -> torch.Tensor:
        header, buffers = message_parts(message)
        check_codec_and_version(header, self.name, FORMAT_VERSION)
        shape = header_shape(header)
        out_dtype = header_dtype(header)
        try:
            n_txt, h, w = (int(v) for v in header_field(header, "grid", list))
            lanes, steps, groups = (int(v) for v in header_field(header, "rans", list))
            step = float(header_field(header, "step", (int, float)))
            parts = header_field(header, "parts", dict)
        except (TypeError, ValueError):
            raise CodecError("gpu codec header has malformed grid/rans/step/parts fields") from None
        stream = header.get("stream")
        delta = bool(stream and stream.get("delta"))
        names = (["center"] if not delta else []) + ["shifts", "buckets", "freq", "group_words", "states", "words",
                                                      "esc_pos", "esc_val"]
        if sorted(parts) != sorted(names) or len(buffers) != len(names):
            raise CodecError(f"gpu codec message needs {len(names)} buffers {names}, got {len(buffers)}")
        layout = TokenLayout(n_txt, h, w) if h else None
        p = _plan(shape, layout, True)
        loud = header.get("loud", [])
        if not (isinstance(loud, list) and all(isinstance(i, int) and 0 <= i < p.batch * p.h * p.w for i in loud)
                and len(set(loud)) == len(loud)):
            raise CodecError("gpu codec header lists impossible loud tokens")
        p = replace(p, loud=tuple(loud))
        if p.batch * p.tokens * p.channels != math.prod(shape) or (not h and n_txt != p.tokens):
            raise CodecError(f"gpu codec grid {[n_txt, h, w]} does not fit shape {shape}")
        geo = Geometry(p.n_coef, lanes, steps, groups)
        if geo.padded < geo.n or lanes < 1 or steps < 1:
            raise CodecError(f"gpu codec rANS geometry {lanes}x{steps}x{groups} cannot hold {geo.n} symbols")
        if delta:
            if state is None or state.reference is None or state.signature != p or \
                    stream.get("ref") != state.seq:
                have = None if state is None else state.seq
                raise CodecStateError(f"delta message refers to message {stream.get('ref')}, this end has "
                                      f"{have}: reset the stream and send a key message")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        sizes = {name: memoryview(b).nbytes for name, b in zip(names, buffers)}
        tables = header.get("tables")
        if not (isinstance(tables, list) and all(isinstance(t, int) and 0 <= t < N_BUCKETS for t in tables)
                and len(set(tables)) == len(tables)):
            raise CodecError("gpu codec header lists impossible context tables")
        expected = {"center": p.channels * 2, "shifts": p.channels, "buckets": N_CLASSES * p.channels, "freq": len(tables) * ALPHABET * 2,
                    "group_words": groups * 4, "states": groups * lanes * 4}
        for name, size in expected.items():
            if name in sizes and sizes[name] != size:
                raise CodecError(f"gpu codec buffer {name!r} has {sizes[name]} bytes, expected {size}")
        blob = _from_bytes(buffers, sum(sizes.values()), dev)
        pieces, pos = {}, 0
        for name in names:
            pieces[name] = blob[pos:pos + sizes[name]].clone()  # aligned storage for the views below
            pos += sizes[name]
        try:
            bucket = pieces["buckets"].to(torch.int64)
            shifts = pieces["shifts"].to(torch.int64)
            freq = torch.zeros(N_BUCKETS, ALPHABET, dtype=torch.int64, device=dev)
            freq[torch.tensor(tables, dtype=torch.int64, device=dev)] = \
                pieces["freq"].view(torch.int16).to(torch.int64).reshape(len(tables), ALPHABET)
            group_words = pieces["group_words"].view(torch.int32).to(torch.int64)
            states = pieces["states"].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            words = pieces["words"].view(torch.int16).to(torch.int64) & 0xFFFF
            esc_pos = pieces["esc_pos"].view(torch.int64)
            esc_val = pieces["esc_val"].view(torch.float32)
        except RuntimeError as exc:
            raise CodecError(f"gpu codec buffers have impossible sizes: {exc}") from None
        if bool((freq < 0).any()) or bool((freq.sum(-1) != 0).logical_and(freq.sum(-1) != 4096).any()):
            raise CodecError("gpu codec frequency tables are corrupt")
        if int(group_words.sum()) != words.numel() or bool((group_words < 0).any()):
            raise CodecError("gpu codec word counts do not match the word stream: truncated or corrupt")
        if bool(((bucket < 0) | (bucket >= N_BUCKETS)).any()) or esc_pos.numel() != esc_val.numel() or \
                bool((shifts > MAX_SHIFT).any()):
            raise CodecError("gpu codec context or escape buffers are corrupt")
        if esc_pos.numel() and bool(((esc_pos < 0) | (esc_pos >= p.n_coef)).any()):
            raise CodecError("gpu codec escape positions point outside the tensor")
        ctx = bucket.view(N_CLASSES, p.channels)[_row_classes(p, dev)].reshape(-1)
        try:
            token, raw = _rans(dev).rans_decode(RansStreams(words, group_words, states.view(groups, lanes)), ctx,
                                                freq, geo)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise CodecError(f"gpu codec entropy stream is corrupt: {exc}") from None
        recon = (detokenize(token, raw).float().view(-1, p.channels) * _steps(step, shifts)).reshape(-1)
        recon[esc_pos] = esc_val
        d = dct_matrix(device=dev)
        if delta:
            full = state.reference["coef"] + recon
            fill = state.reference["fill"]
            x = _inverse(full, p, d)
        else:
            center = pieces["center"].view(torch.bfloat16).float()
            x = _inverse(recon, p, d) + center
            full, fill = (recon + _expand_center(center, p), center) if state is not None and stream else (None, None)
        if state is not None and stream:
            state.reference, state.signature, state.seq = {"coef": full, "fill": fill}, p, int(stream["seq"])
        return x.reshape(shape).to(out_dtype)


def _fit_step(coef2d: torch.Tensor, spread: torch.Tensor, floor: float, target: float,
              numel: int) -> tuple[float, torch.Tensor]:
    """The largest step (and its per-channel shifts) whose error stays within `target`.

    The transform is orthonormal, so the error is measured exactly on the coefficients.
    Start from the high-rate estimate (every coefficient off by a uniform error of
    variance step^2/12); coefficients smaller than a step (quiet channels, high bands)
    err less than that, so the step can usually grow: a few multiplicative updates find
    it, each one pass over the coefficients.
    """
    if target <= 0:
        return 1.0, torch.zeros_like(spread, dtype=torch.int64)
    step = target * math.sqrt(12.0 / max(numel, 1))
    best = None
    for _ in range(FIT_ITERATIONS):
        step = float(torch.tensor(step, dtype=torch.float32))  # the exact value both ends use
        shifts = _channel_shifts(step, spread, floor)
        steps_c = _steps(step, shifts)
        err = float((coef2d - torch.round(coef2d / steps_c) * steps_c).norm())
        if err <= target and (best is None or step > best[0]):
            best = (step, shifts)
        if err == 0:
            break
        ratio = target / err
        # Over the target: shrink in proportion (the error scales about with the step), with
        # a margin so the next try lands under it. Under: grow, damped, to stay under.
        step *= max(0.25, ratio * 0.995) if ratio < 1 else min(4.0, ratio ** 0.9)
    return best if best is not None else _fit_step(coef2d, spread, floor, target * 0.5, numel)


def _as_u32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 bit patterns (sent as little-endian uint32)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _as_u16(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) as int16 bit patterns (sent as little-endian uint16)."""
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)


def _rans(device: torch.device):
    """The fused kernels on a CUDA device with Triton, else the reference torch ops (same bytes)."""
    return entropy_triton if entropy_triton.available(torch.device(device)) else entropy
