"""The `gpu` codec in torch ops: the reference backend (CPU, or a GPU without Triton).

Same message format as the fused backend (codec/gpu_kernels.py), so either decodes the
other's messages. Pipeline (encode):

1. centre each channel on its median (robust: loud tokens do not move it), rounded to
   bf16 so both ends subtract the same value;
2. transform (gpu_layout.forward): image tokens on their grid get an orthonormal 8x8
   DCT per channel, which gathers the spatial redundancy of DiT activations into few
   coefficients; text tokens are left as they are; loud tokens get rows of their own;
3. quantise every coefficient with ONE step size. For a target on the relative L2 error
   of the whole tensor this is the rate-optimal choice (reverse water-filling): quiet
   channels and bands fall to zero and cost almost nothing, loud ones get the levels;
   per-channel scaling would spend bits on channels the error metric barely sees. A
   per-channel floor (channel_rel_err) gives a finer step, its own, to channels one
   global step would zero out;
4. entropy-code the integers (codec/entropy.py): one rANS table per context, the
   context being the log-spread of the coefficient's (class, channel) cell, so each
   table fits the distribution it codes; values too large for the token set travel
   exactly.

Temporal mode: the reference is the previous reconstruction's centred coefficients,
rounded to bf16 (gpu_layout.REF_DTYPE); a delta message codes the change from it times
a least-squares weight its header gives (gpu_layout.prediction_weight; element-wise
float ops that give the same bits on every device: see gpu_layout on the step sizes and
the weight).
"""

from __future__ import annotations

import math

import torch

from .base import CodecError
from .entropy import ALPHABET, ESCAPE, Geometry, RansStreams, detokenize, normalize_counts, rans_decode, \
    rans_encode, tokenize
from .gpu_layout import (N_BUCKETS, N_CLASSES, REF_DTYPE, Layout, channel_centre, channel_floors,
                         channel_spread, channel_steps, context_buckets, find_loud, forward, inverse,
                         prediction_weight, round_step, row_classes, sample_rows, symbol_contexts)

FIT_ITERATIONS = 5  # passes that fit the step size to the error target
ESCAPE_LIMIT = 1 << 15  # |q| from here travels exactly (int16 range: see entropy.py)


def encode(x: torch.Tensor, layout: Layout, settings, reference: dict | None, keep: bool) -> dict:
    """(B, T, C) -> the parts of a message (gpu.py assembles it). `reference`: the
    stream's reference for a delta message, else None; `keep`: return the new one."""
    device = x.device
    x = x.float()
    if not torch.isfinite(x).all():
        raise CodecError("cannot encode NaN or Inf values; send this tensor with the raw codec")
    p = layout
    rows = sample_rows(x)
    center = reference["center"] if reference is not None else channel_centre(rows)
    centred = x - center
    if reference is None and p.h:
        token_sq = centred[:, p.n_txt:].pow(2).sum(-1).reshape(-1)
        idx, count = find_loud(token_sq, p)
        p = Layout(p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, tuple(idx[: int(count)].tolist()))
    coef = forward(centred, p)
    pred = None
    if reference is not None:  # the change from the weighted reference (gpu_layout.prediction_weight)
        ref = reference["coef"].float()
        pred = prediction_weight((coef.double() * ref).sum(), (ref.double() * ref).sum()).to(device)
        coef = coef - pred * ref
    norm = float(x.norm())
    spread = channel_spread(rows - center)
    floors = channel_floors(spread, settings.channel_rel_err * math.sqrt(12.0))
    coef2d = coef.view(-1, p.channels)
    step = fit_step(coef2d, floors, settings.rel_err * norm, x.numel())
    steps_c = channel_steps(step, floors)
    q = torch.round(coef2d / steps_c)
    escape = q.abs() >= ESCAPE_LIMIT
    q = torch.where(escape, torch.full_like(q, -ESCAPE_LIMIT), q).to(torch.int64).reshape(-1)
    token, n_raw, raw = tokenize(q)

    cls = row_classes(p, device)
    sq = torch.zeros(N_CLASSES, p.channels, device=device).index_add_(0, cls, coef2d * coef2d)
    buckets = context_buckets(sq, torch.bincount(cls, minlength=N_CLASSES).float()[:, None], steps_c)
    ctx = symbol_contexts(p, buckets)
    # bincount, not index_put_(accumulate=True): on CUDA the latter sorts (0.6 s for 28 M symbols)
    counts = torch.bincount(ctx * ALPHABET + token, minlength=N_BUCKETS * ALPHABET).view(N_BUCKETS, ALPHABET)
    freq = normalize_counts(counts)
    s = settings
    geo = Geometry.for_count(token.numel(), s.lanes, s.steps_for(reference is not None), s.max_steps)
    streams = rans_encode(token, n_raw, raw, ctx, freq, geo)
    esc_pos = torch.nonzero(token == ESCAPE).flatten()
    esc_val = coef[esc_pos]
    out = {
        "layout": p, "step": float(step), "center": None if reference is not None else center,
        "steps": steps_c.to(torch.bfloat16), "buckets": buckets, "freq": freq, "geo": geo,
        "group_words": streams.group_words.to(torch.int32), "states": _as_i32(streams.states),
        "words": _as_i16(streams.words), "esc_pos": esc_pos, "esc_val": esc_val.float(),
        "tables": torch.nonzero(freq.sum(-1) > 0).flatten().tolist(),
        "norm": norm, "pred": None if pred is None else float(pred),
    }
    if keep:
        recon = (q.view(-1, p.channels).float() * steps_c).reshape(-1)
        recon[esc_pos] = esc_val
        full = recon if reference is None else pred * reference["coef"].float() + recon
        out["reference"] = {"coef": full.to(REF_DTYPE), "center": center}
    return out


def decode(pieces: dict, layout: Layout, geo: Geometry, center: torch.Tensor, reference: torch.Tensor | None,
           keep: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, object]:
    """The message's parts (tensors on the target device, sizes and small parts checked
    by gpu.py) ->
    ((B, T, C) in out_dtype, the new reference coefficients when `keep`)."""
    p = layout
    buckets = pieces["buckets"].to(torch.int64)
    freq = pieces["freq"]
    group_words = pieces["group_words"].to(torch.int64)
    states = pieces["states"].to(torch.int64) & 0xFFFFFFFF
    words = pieces["words"].to(torch.int64) & 0xFFFF
    esc_pos, esc_val = pieces["esc_pos"], pieces["esc_val"]
    # tables, word counts, steps, buckets and escapes were checked by gpu.py (on the host)
    ctx = symbol_contexts(p, buckets)
    try:
        token, raw = rans_decode(RansStreams(words, group_words, states.view(geo.groups, geo.lanes)), ctx, freq, geo)
    except (ValueError, IndexError, RuntimeError) as exc:
        raise CodecError(f"gpu codec entropy stream is corrupt: {exc}") from None
    if not torch.equal(torch.nonzero(token == ESCAPE).flatten(), esc_pos):  # (the fused decoder checks alike)
        raise CodecError("gpu codec escapes are not where the entropy stream codes them")
    steps_c = pieces["steps"].float()
    coef = (detokenize(token, raw).float().view(-1, p.channels) * steps_c).reshape(-1)
    coef[esc_pos] = esc_val
    full = coef if reference is None else pieces["pred"] * reference.float() + coef
    x = inverse(full, p) + center
    return x.to(out_dtype), (full.to(REF_DTYPE) if keep else None)


def fit_step(coef2d: torch.Tensor, floors: torch.Tensor, target: float, numel: int) -> torch.Tensor:
    """The largest global step whose error stays within `target`, each channel's step
    limited by its floor (gpu_layout.channel_steps).

    The transform is orthonormal, so the error is measured exactly on the coefficients.
    Start from the high-rate estimate (every coefficient off by a uniform error of
    variance step^2/12); coefficients smaller than a step (quiet channels, high bands)
    err less than that, so the step can usually grow: a few multiplicative updates find
    it, each one pass over the coefficients. Steps are bf16 values (gpu_layout).
    """
    if target <= 0:
        return torch.tensor(1.0, device=coef2d.device)
    step = target * math.sqrt(12.0 / max(numel, 1))
    best = None
    for _ in range(FIT_ITERATIONS):
        s = round_step(torch.tensor(step, dtype=torch.float32, device=coef2d.device))
        steps_c = channel_steps(s, floors)
        q = torch.round(coef2d / steps_c)
        err = float(torch.where(q.abs() >= ESCAPE_LIMIT, 0.0, coef2d - q * steps_c).norm())
        if err <= target and (best is None or float(s) > float(best)):
            best = s
        if err == 0:
            break
        ratio = target / err
        # Over the target: shrink in proportion (the error scales about with the step), with
        # a margin so the next try lands under it. Under: grow, damped, to stay under.
        step = float(s) * (max(0.25, ratio * 0.995) if ratio < 1 else min(4.0, ratio ** 0.9))
    return best if best is not None else fit_step(coef2d, floors, target * 0.5, numel)


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 bit patterns (sent as little-endian uint32)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _as_i16(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) as int16 bit patterns (sent as little-endian uint16)."""
    return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)
