"""Fused GPU kernels for codec/entropy.py's rANS: the same bytes, one launch per pass.

The reference implementation loops over steps in Python, one batch of torch ops per
step: correct everywhere, but on a GPU thousands of small launches. Here one Triton
program owns one group of lanes (one warp for the default 32 lanes) and runs all its
steps in registers, in 32-bit arithmetic. Words are placed with an in-program prefix sum, exactly as the
reference places them, so either implementation decodes the other's messages (tests
check they agree bit for bit).

The kernels read what the gpu codec has, not what the reference takes: the encoder reads
int16 quantised values and derives each symbol's token, raw bits and context table
itself (codec/gpu_layout.py says how); the decoder writes dequantised float32
coefficients. No int64 symbol arrays cross memory.
"""

from __future__ import annotations

import torch

from .entropy import ALPHABET, ESCAPE, EXACT_TOKENS, MAX_EXP, PROB_BITS, STATE_LOW, cumulative, slot_table
from .gpu_layout import LOUD_CLASS, N_BUCKETS, ROWS_PER_BLOCK, TEXT_CLASS

# The kernels spell out the state bound (65536) and the block rows (64): keep them in step.
assert (STATE_LOW, ROWS_PER_BLOCK) == (65536, 64)

try:  # Triton is optional: present with CUDA builds of torch, absent on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


#: lanes one warp runs: 32 is one lane a thread. 64 gives each thread two independent states
#: (more instruction-level parallelism, half the warps): no faster on an H200 (bench/NOTES.md),
#: so the kernels are issue-bound, not latency-bound.
LANES_PER_WARP = 32


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def tokenize(q, EXACT: tl.constexpr, MAXE: tl.constexpr, ESC: tl.constexpr):
        """int32 values (from int16) -> (token, raw bit count, raw bits), as entropy.tokenize."""
        v = tl.abs(q)
        sign = (q < 0).to(tl.int32)
        # floor(log2 v), exactly: the exponent field of v as float32 (v < 2^24 is exact)
        e = (tl.maximum(v, 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
        e = tl.minimum(tl.maximum(e, 4), MAXE)
        mant = e - 1
        big = v >= EXACT
        esc = v >= (1 << (MAXE + 1))
        tok = tl.where(big, EXACT + 2 * (e - 4) + ((v >> mant) & 1), v)
        raw = tl.where(big, ((v & ((1 << mant) - 1)) << 1) | sign, sign)
        nr = tl.where(big, e, (v > 0).to(tl.int32))
        return tl.where(esc, ESC, tok), tl.where(esc, 0, nr), tl.where(esc, 0, raw)

    @triton.jit
    def raw_bit_count(t, EXACT: tl.constexpr, ESC: tl.constexpr):
        n = tl.where(t >= EXACT, (t - EXACT) // 2 + 4, (t > 0).to(tl.int32))
        return tl.where(t == ESC, 0, n)

    @triton.jit
    def detokenize(t, raw, EXACT: tl.constexpr, ESC: tl.constexpr):
        big = t >= EXACT
        e = (t - EXACT) // 2 + 4
        mant = tl.maximum(e - 1, 0)
        lead = (1 << e) | (((t - EXACT) & 1) << mant)
        v = tl.where(big, lead | (raw >> 1), t)
        v = tl.where(t == ESC, 0, v)
        return tl.where(((raw & 1) != 0) & (v > 0), -v, v)

    @triton.jit
    def row_class(row, TEXT_ROWS, FIXED_ROWS, TEXT: tl.constexpr, LOUD: tl.constexpr):
        """Class of a coefficient row (gpu_layout: text | 8x8 blocks | loud)."""
        r = (row - TEXT_ROWS) % 64
        s = r // 8 + r % 8
        band = (s >= 1).to(tl.int32) + (s >= 3).to(tl.int32) + (s >= 6).to(tl.int32) + (s >= 10).to(tl.int32)
        return tl.where(row < TEXT_ROWS, TEXT, tl.where(row < FIXED_ROWS, band, LOUD))

    @triton.jit
    def _context(offs, valid, bucket_ptr, TEXT_ROWS, FIXED_ROWS, C: tl.constexpr, TEXT: tl.constexpr,
                 LOUD: tl.constexpr, NB: tl.constexpr):
        row = offs // C
        ch = offs - row * C
        cls = row_class(row, TEXT_ROWS, FIXED_ROWS, TEXT, LOUD)
        b = tl.load(bucket_ptr + cls * C + ch, mask=valid, other=0).to(tl.int32)
        return tl.minimum(b, NB - 1), ch  # a corrupt bucket must not index past the tables

    @triton.jit
    def _emit(x, need, ptr, out):
        """The lanes in `need` push their state's low 16 bits, in lane order, at `ptr`."""
        pos = ptr + tl.cumsum(need.to(tl.int32), 0) - 1
        tl.store(out + pos, (x & 0xFFFF).to(tl.int16), mask=need)
        return tl.where(need, x >> 16, x), ptr + tl.sum(need.to(tl.int32), 0)

    @triton.jit
    def _refill(x, need, ptr, start, total_words, words_ptr, bad):
        """The inverse of _emit, reading the group's stream backwards from `ptr`; reads
        before the group's `start` (a corrupt stream) set `bad` and read nothing."""
        blk = ptr - tl.sum(need.to(tl.int32), 0)
        pos = blk + tl.cumsum(need.to(tl.int32), 0) - 1
        bad |= (need & (pos < start)).to(tl.int32)
        w = tl.load(words_ptr + pos, mask=need & (pos >= start) & (pos >= 0) & (pos < total_words), other=0)
        return tl.where(need, (x << 16) | (w.to(tl.uint32) & 0xFFFF), x), blk, bad

    @triton.jit
    def _encode_kernel(q_ptr, bucket_ptr, freq_ptr, cum_ptr, rcp_ptr, out_ptr, count_ptr, state_ptr, n_ptr,
                       TEXT_ROWS, FIXED_ROWS, C: tl.constexpr, STEPS: tl.constexpr, LANES: tl.constexpr,
                       ALPHA: tl.constexpr, EXACT: tl.constexpr, MAXE: tl.constexpr, ESC: tl.constexpr,
                       TEXT: tl.constexpr, LOUD: tl.constexpr, NB: tl.constexpr, PB: tl.constexpr):
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        n = tl.load(n_ptr)
        out = out_ptr + g.to(tl.int64) * (2 * STEPS * LANES)
        x = tl.full((LANES,), 65536, tl.uint32)
        ptr = tl.zeros((), tl.int32)
        for k in range(STEPS):
            offs = (g * STEPS + (STEPS - 1 - k)) * LANES + lanes
            valid = offs < n
            q = tl.load(q_ptr + offs, mask=valid, other=0).to(tl.int32)
            tok, nr, raw = tokenize(q, EXACT, MAXE, ESC)
            cx, _ = _context(offs, valid, bucket_ptr, TEXT_ROWS, FIXED_ROWS, C, TEXT, LOUD, NB)
            # raw bits first (the decoder pops them after the token): room for n more bits?
            need = (nr > 0) & ((x >> (32 - tl.maximum(nr, 1)).to(tl.uint32)) != 0)
            x, ptr = _emit(x, need, ptr, out)
            x = (x << nr.to(tl.uint32)) | raw.to(tl.uint32)
            # then the token
            f = tl.load(freq_ptr + cx * ALPHA + tok, mask=valid, other=1).to(tl.uint32)
            c = tl.load(cum_ptr + cx * ALPHA + tok, mask=valid, other=0).to(tl.uint32)
            rcp = tl.load(rcp_ptr + cx * ALPHA + tok, mask=valid, other=1.0)
            f = tl.where(valid & (f > 0), f, 1)
            need = valid & ((x >> (32 - PB)) >= f)
            x, ptr = _emit(x, need, ptr, out)
            # x // f without an integer division: x * (1/f) in float64 is within 2^-19 of
            # the quotient (x < 2^32), whose fraction is 0 or at least 1/f >= 2^-14, so
            # adding 2^-16 and truncating gives it exactly.
            qt = (x.to(tl.float64) * rcp + 0.0000152587890625).to(tl.uint32)
            x = tl.where(valid, (qt << PB) + (x - qt * f) + c, x)
        tl.store(count_ptr + g, ptr)
        tl.store(state_ptr + g.to(tl.int64) * LANES + lanes, x.to(tl.int32, bitcast=True))

    @triton.jit
    def _decode_kernel(words_ptr, start_ptr, count_ptr, state_ptr, total_ptr, bucket_ptr, freq_ptr, cum_ptr,
                       slot_ptr, steps_ptr, coef_ptr, bad_ptr, n, TEXT_ROWS, FIXED_ROWS, C: tl.constexpr,
                       STEPS: tl.constexpr, LANES: tl.constexpr, ALPHA: tl.constexpr, EXACT: tl.constexpr,
                       ESC: tl.constexpr, TEXT: tl.constexpr, LOUD: tl.constexpr, NB: tl.constexpr,
                       PB: tl.constexpr):
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        total_words = tl.load(total_ptr)
        start = tl.load(start_ptr + g)
        ptr = start + tl.load(count_ptr + g)
        x = tl.load(state_ptr + g.to(tl.int64) * LANES + lanes).to(tl.uint32, bitcast=True)
        bad = tl.zeros((LANES,), tl.int32)
        for i in range(STEPS):
            offs = (g * STEPS + i) * LANES + lanes
            valid = offs < n
            cx, ch = _context(offs, valid, bucket_ptr, TEXT_ROWS, FIXED_ROWS, C, TEXT, LOUD, NB)
            slot = x & ((1 << PB) - 1)
            t = tl.load(slot_ptr + cx * (1 << PB) + slot.to(tl.int32), mask=valid, other=0).to(tl.int32)
            f = tl.load(freq_ptr + cx * ALPHA + t, mask=valid, other=1).to(tl.uint32)
            c = tl.load(cum_ptr + cx * ALPHA + t, mask=valid, other=0).to(tl.uint32)
            bad |= (valid & (f == 0)).to(tl.int32)
            f = tl.where(f == 0, 1, f)
            x = tl.where(valid, (f * (x >> PB) + slot) - c, x)
            # refill after the token, then pop the raw bits and refill again
            need = valid & (x < 65536)
            x, ptr, bad = _refill(x, need, ptr, start, total_words, words_ptr, bad)
            nr = tl.where(valid, raw_bit_count(t, EXACT, ESC), 0)
            raw = (x & ((tl.full((LANES,), 1, tl.uint32) << nr.to(tl.uint32)) - 1)).to(tl.int32)
            x = x >> nr.to(tl.uint32)
            need = x < 65536
            x, ptr, bad = _refill(x, need, ptr, start, total_words, words_ptr, bad)
            q = detokenize(t, raw, EXACT, ESC)
            step = tl.load(steps_ptr + ch, mask=valid, other=0.0)
            tl.store(coef_ptr + offs, q.to(tl.float32) * step, mask=valid)
        bad |= (x != 65536).to(tl.int32)
        bad |= (ptr != start).to(tl.int32)
        tl.atomic_or(bad_ptr + lanes * 0, bad, mask=bad != 0)

    @triton.jit
    def _gather_words_kernel(buf_ptr, count_ptr, start_ptr, out_ptr, CAP, BLOCK: tl.constexpr):
        g = tl.program_id(0)
        cnt = tl.load(count_ptr + g)
        start = tl.load(start_ptr + g)
        for i in range(0, cnt, BLOCK):
            o = i + tl.arange(0, BLOCK)
            m = o < cnt
            tl.store(out_ptr + start + o, tl.load(buf_ptr + g.to(tl.int64) * CAP + o, mask=m), mask=m)


def _row_args(text_rows: int, fixed_rows: int, channels: int) -> dict:
    return dict(TEXT_ROWS=text_rows, FIXED_ROWS=fixed_rows, C=channels, ALPHA=ALPHABET, EXACT=EXACT_TOKENS,
                ESC=ESCAPE, TEXT=TEXT_CLASS, LOUD=LOUD_CLASS, NB=N_BUCKETS, PB=PROB_BITS)


def encode(q16: torch.Tensor, n: torch.Tensor, buckets: torch.Tensor, text_rows: int, fixed_rows: int,
           freq: torch.Tensor, geo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rANS-code int16 values `q16` (only the first `n`, a 0-d device tensor; geo sized for
    q16's length). -> (per-group word buffers (G, 2*steps*lanes) int16, words per group
    (G,) int32, final states (G, lanes) as int32 bit patterns). No host round trip."""
    device = q16.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    out = torch.empty(G, 2 * S * W, dtype=torch.int16, device=device)
    counts = torch.empty(G, dtype=torch.int32, device=device)
    states = torch.empty(G, W, dtype=torch.int32, device=device)
    # inf where a symbol is absent: never loaded, since the tables come from these symbols'
    # counts (when those are sampled, every symbol of a table in use keeps a frequency >= 1)
    rcp = (1.0 / freq.to(torch.float64)).contiguous()
    _encode_kernel[(G,)](q16, buckets, freq.to(torch.int32).contiguous(), cumulative(freq).to(torch.int32).contiguous(),
                         rcp, out, counts, states, n.to(torch.int32).reshape(1), STEPS=S, LANES=W, MAXE=MAX_EXP,
                         num_warps=max(1, W // LANES_PER_WARP), **_row_args(text_rows, fixed_rows, buckets.shape[1]))
    return out, counts, states


def gather_words(buf: torch.Tensor, counts: torch.Tensor, out: torch.Tensor) -> None:
    """The groups' word buffers back to back into `out` (int16, room for all of them):
    no host round trip, the caller reads the total later."""
    starts = (torch.cumsum(counts, 0, dtype=torch.int64) - counts).contiguous()
    _gather_words_kernel[(counts.numel(),)](buf, counts, starts, out, buf.shape[1], BLOCK=1024)


def decode(words: torch.Tensor, total_words: torch.Tensor, group_words: torch.Tensor, states: torch.Tensor,
           buckets: torch.Tensor, text_rows: int, fixed_rows: int, freq: torch.Tensor, steps_c: torch.Tensor, geo,
           bad: torch.Tensor) -> torch.Tensor:
    """Decode to dequantised float32 coefficients (escapes as 0), plus one spare slot at
    the end (a place for escapes that are not there). `words` may be longer than the
    stream: `total_words` (a 1-element device tensor) says how much is. Corruption sets
    `bad` (a 1-element int32 device tensor) instead of raising: the caller checks it once."""
    device = words.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    starts = (torch.cumsum(group_words.to(torch.int64), 0) - group_words).to(torch.int32).contiguous()
    coef = torch.empty(geo.n + 1, dtype=torch.float32, device=device)
    if words.numel() == 0:
        words = torch.zeros(1, dtype=torch.int16, device=device)
    _decode_kernel[(G,)](words, starts, group_words.to(torch.int32).contiguous(), states.contiguous(), total_words,
                         buckets, freq.to(torch.int32).contiguous(), cumulative(freq).to(torch.int32).contiguous(),
                         slot_table(freq).to(torch.uint8).contiguous(), steps_c.contiguous(), coef, bad, geo.n,
                         STEPS=S, LANES=W, num_warps=max(1, W // LANES_PER_WARP),
                         **_row_args(text_rows, fixed_rows, buckets.shape[1]))
    return coef
