"""Fused GPU kernels for codec/entropy.py's rANS: the same bytes, one launch per pass.

The reference implementation loops over steps in Python, one batch of torch ops per
step: correct everywhere, but on a GPU thousands of small launches. Here one Triton
program owns one group of lanes and runs all its steps in registers; words are placed
with an in-program prefix sum, exactly as the reference places them, so either
implementation decodes the other's messages (tests check they agree bit for bit).
"""

from __future__ import annotations

import torch

from .entropy import (ALPHABET, ESCAPE, EXACT_TOKENS, PROB_BITS, PROB_SCALE, STATE_LOW, Geometry, RansStreams,
                      cumulative, slot_table)

# The kernels spell these constants out (65536, 4095, 12, 20): keep them in step.
assert (PROB_BITS, PROB_SCALE, STATE_LOW) == (12, 4096, 65536)

try:  # Triton is optional: present with CUDA builds of torch, absent on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _encode_kernel(tok_ptr, nraw_ptr, raw_ptr, ctx_ptr, freq_ptr, cum_ptr, out_ptr, count_ptr, state_ptr,
                       n, STEPS: tl.constexpr, LANES: tl.constexpr, ALPHA: tl.constexpr):
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        cap = 2 * STEPS * LANES
        out = out_ptr + g.to(tl.int64) * cap
        x = tl.full((LANES,), 65536, tl.int64)
        ptr = tl.zeros((), tl.int64)
        for k in range(STEPS):
            i = STEPS - 1 - k
            offs = (g.to(tl.int64) * STEPS + i) * LANES + lanes
            valid = offs < n
            tok = tl.load(tok_ptr + offs, mask=valid, other=0).to(tl.int64)
            nr = tl.load(nraw_ptr + offs, mask=valid, other=0).to(tl.int64)
            rb = tl.load(raw_ptr + offs, mask=valid, other=0).to(tl.int64)
            cx = tl.load(ctx_ptr + offs, mask=valid, other=0).to(tl.int64)
            # raw bits
            need = x >= (tl.full((LANES,), 1, tl.int64) << (32 - nr))
            pos = ptr + tl.cumsum(need.to(tl.int64), 0) - 1
            tl.store(out + pos, (x & 0xFFFF).to(tl.int16), mask=need)
            ptr += tl.sum(need.to(tl.int64), 0)
            x = tl.where(need, x >> 16, x)
            x = (x << nr) | rb
            # token
            f = tl.load(freq_ptr + cx * ALPHA + tok, mask=valid, other=1).to(tl.int64)
            c = tl.load(cum_ptr + cx * ALPHA + tok, mask=valid, other=0).to(tl.int64)
            f = tl.where(valid, f, 1)
            need = valid & (x >= (f << (32 - 12)))
            pos = ptr + tl.cumsum(need.to(tl.int64), 0) - 1
            tl.store(out + pos, (x & 0xFFFF).to(tl.int16), mask=need)
            ptr += tl.sum(need.to(tl.int64), 0)
            x = tl.where(need, x >> 16, x)
            x = tl.where(valid, ((x // f) << 12) + (x % f) + c, x)
        tl.store(count_ptr + g, ptr)
        tl.store(state_ptr + g.to(tl.int64) * LANES + lanes, x)

    @triton.jit
    def _decode_kernel(words_ptr, start_ptr, count_ptr, state_ptr, ctx_ptr, freq_ptr, cum_ptr, slot_ptr,
                       tok_ptr, raw_ptr, err_ptr, n, STEPS: tl.constexpr, LANES: tl.constexpr, ALPHA: tl.constexpr,
                       EXACT: tl.constexpr, ESC: tl.constexpr):
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        start = tl.load(start_ptr + g)
        ptr = start + tl.load(count_ptr + g)
        x = tl.load(state_ptr + g.to(tl.int64) * LANES + lanes)
        bad = tl.zeros((LANES,), tl.int32)
        for i in range(STEPS):
            offs = (g.to(tl.int64) * STEPS + i) * LANES + lanes
            valid = offs < n
            cx = tl.load(ctx_ptr + offs, mask=valid, other=0).to(tl.int64)
            slot = x & 4095
            t = tl.load(slot_ptr + cx * 4096 + slot, mask=valid, other=0).to(tl.int64)
            f = tl.load(freq_ptr + cx * ALPHA + t, mask=valid, other=1).to(tl.int64)
            c = tl.load(cum_ptr + cx * ALPHA + t, mask=valid, other=0).to(tl.int64)
            bad |= (valid & (f == 0)).to(tl.int32)
            f = tl.where(f == 0, 1, f)
            x = tl.where(valid, f * (x >> 12) + slot - c, x)
            need = valid & (x < 65536)
            blk = ptr - tl.sum(need.to(tl.int64), 0)
            pos = blk + tl.cumsum(need.to(tl.int64), 0) - 1
            bad |= (need & (pos < start)).to(tl.int32)
            w = tl.load(words_ptr + pos, mask=need & (pos >= start), other=0).to(tl.int64) & 0xFFFF
            x = tl.where(need, (x << 16) | w, x)
            ptr = blk
            tl.store(tok_ptr + offs, t, mask=valid)
            e = (t - EXACT) // 2 + 4
            nr = tl.where(t >= EXACT, e, (t > 0).to(tl.int64))
            nr = tl.where(t == ESC, 0, nr)
            nr = tl.where(valid, nr, 0)
            tl.store(raw_ptr + offs, x & ((tl.full((LANES,), 1, tl.int64) << nr) - 1), mask=valid)
            x = x >> nr
            need = x < 65536
            blk = ptr - tl.sum(need.to(tl.int64), 0)
            pos = blk + tl.cumsum(need.to(tl.int64), 0) - 1
            bad |= (need & (pos < start)).to(tl.int32)
            w = tl.load(words_ptr + pos, mask=need & (pos >= start), other=0).to(tl.int64) & 0xFFFF
            x = tl.where(need, (x << 16) | w, x)
            ptr = blk
        bad |= (x != 65536).to(tl.int32)
        bad |= (ptr != start).to(tl.int32)
        tl.store(err_ptr + g.to(tl.int64) * LANES + lanes, bad)


def rans_encode(token, n_raw, raw, ctx, freq, geo: Geometry) -> RansStreams:
    device = token.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    cum = cumulative(freq).to(torch.int32).contiguous()
    out = torch.empty(G, 2 * S * W, dtype=torch.int16, device=device)
    counts = torch.empty(G, dtype=torch.int64, device=device)
    states = torch.empty(G, W, dtype=torch.int64, device=device)
    _encode_kernel[(G,)](token.to(torch.int32), n_raw.to(torch.int32), raw.to(torch.int32), ctx.to(torch.int32),
                         freq.to(torch.int32).contiguous(), cum, out, counts, states, geo.n,
                         STEPS=S, LANES=W, ALPHA=ALPHABET)
    mask = torch.arange(out.shape[1], device=device)[None, :] < counts[:, None]
    words = out[mask].to(torch.int64) & 0xFFFF
    return RansStreams(words=words, group_words=counts, states=states)


def rans_decode(streams: RansStreams, ctx, freq, geo: Geometry):
    device = ctx.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    cum = cumulative(freq).to(torch.int32).contiguous()
    slots = slot_table(freq).to(torch.int32).contiguous()
    starts = (torch.cumsum(streams.group_words, 0) - streams.group_words).contiguous()
    tok = torch.empty(geo.n, dtype=torch.int64, device=device)
    raw = torch.empty(geo.n, dtype=torch.int64, device=device)
    err = torch.empty(G, W, dtype=torch.int32, device=device)
    words = streams.words.to(torch.int32).contiguous()
    if words.numel() == 0:
        words = torch.zeros(1, dtype=torch.int32, device=device)
    _decode_kernel[(G,)](words, starts, streams.group_words.contiguous(), streams.states.contiguous(),
                         ctx.to(torch.int32), freq.to(torch.int32).contiguous(), cum, slots, tok, raw, err, geo.n,
                         STEPS=S, LANES=W, ALPHA=ALPHABET, EXACT=EXACT_TOKENS, ESC=ESCAPE)
    if bool(err.any()):
        raise ValueError("rANS stream is corrupt (a group did not decode back to its start)")
    return tok, raw
