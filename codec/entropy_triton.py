"""Fused GPU kernels for codec/entropy.py's rANS: the same bytes, one launch per pass.

The reference implementation loops over steps in Python, one batch of torch ops per
step: correct everywhere, but on a GPU thousands of small launches. Here one Triton
program owns one group of lanes (one warp for the default 32 lanes) and runs all its
steps in registers, in 32-bit arithmetic. Words are placed with an in-program prefix sum, exactly as the
reference places them, so either implementation decodes the other's messages (tests
check they agree bit for bit).

The kernels read what the gpu codec has, not what the reference takes: the encoder reads
one packed int32 a symbol (`pack_symbols`: context, token, raw bits; the quantiser writes
them, so the serial rANS loop does no tokenising and no context lookup); the decoder
finds each symbol's context table itself (codec/gpu_layout.py says how) and writes the
int16 values (ESCAPE_MARK where an escape is). No int64 symbol arrays cross memory.

One warp runs 256 or more steps in series, so what a step waits for and how many
instructions it issues set the time: the encoder loads the next eight steps' symbols while
it codes eight; on a GPU the lanes' prefix counts come from one warp vote and a population
count, not a shuffle scan (`_rank`); each symbol's frequency and cumulative frequency come
in one load (`packed_tables`; the gpu codec's kernels build the same tables on the device).
"""

from __future__ import annotations

import os

import torch

from .entropy import (ALPHABET, ESCAPE, MAX_EXP, PROB_BITS, STATE_LOW, cumulative, detokenize, token_raw_bits,
                      tokenize as reference_tokenize)
from .gpu_layout import N_BUCKETS

# The kernels spell out the state bound (65536) and the packed tables' width (64, below):
# keep them in step.
assert STATE_LOW == 65536

try:  # Triton is optional: present with CUDA builds of torch, absent on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


#: lanes one warp runs: 32 is one lane a thread (the lane ranks come from one warp vote).
LANES_PER_WARP = 32

# A packed symbol (int32): context table << 24 | token << 18 | raw bit count << 14 | raw
# bits. Its top part, context * 64 + token, indexes the encoder's (N_BUCKETS, 64) tables.
KEY_SHIFT = 18
TABLE_WIDTH = 64
# What the decoder writes where an escape's value goes: no coded value is -32768 (values
# of magnitude 32768 and more escape: the quantiser's int16 range).
ESCAPE_MARK = -32768
# Slots per program of the decoder's tables kernel. Comparing a (128, 64) block of slots
# with the symbol ends took 0.023 ms on an H200 (1024 slots: 0.27 ms on an H100, spilling
# its registers); counting the ends one symbol at a time, 1024 slots a program, keeps a
# few registers a slot.
SLOT_BLOCK = 1024
assert TABLE_WIDTH == 64 and ALPHABET <= TABLE_WIDTH and MAX_EXP <= 14 and N_BUCKETS <= 32

# The rANS decoder asks L1 for the word stream this far ahead of where it reads (one
# 128-byte line; a line's first word otherwise waits for L2). H100, one decode kernel:
# key 0.234 -> 0.215 ms, delta 0.325 -> 0.288 ms; two lines ahead: 0.226 and 0.278.
PREFETCH_WORDS = 64

# Triton's interpreter (CI, CPU machines) runs no inline PTX: there the lanes' prefix
# counts come from a scan, which gives the same numbers.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


# Sizes the codec's kernels take as plain ints. Triton would compile a variant for each
# pattern of them (== 1, divisible by 16): a carry of a new size would then compile again,
# inside a sampler step, what GpuCodec.warm_up compiled before. One variant serves every size.
SIZE_ARGS = ("STRIDE", "N_PROGRAMS", "ESC_CAP", "SAMPLE_SHIFT", "share", "GROUPS", "T", "N_TXT", "H", "W", "HB",
             "WB", "TEXT_TILES", "BLOCK_TILES", "TEXT_ROWS", "FIXED_ROWS", "n_loud", "C", "n", "CAP", "HW",
             "G", "n_err", "n_rows", "n_idx")


def any_size(fn):
    """triton.jit, without specialising on the SIZE_ARGS it has (constexprs stay constexprs)."""
    args = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[a for a in args if a in SIZE_ARGS and a not in fn.__annotations__])


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
    def _bucket(row, ch, valid, row_base_ptr, bucket_ptr, NB: tl.constexpr):
        """The context table of the coefficients at (row, ch); row_base: each row's class * C."""
        base = tl.load(row_base_ptr + row, mask=valid, other=0)
        b = tl.load(bucket_ptr + base + ch, mask=valid, other=0).to(tl.int32)
        return tl.minimum(b, NB - 1)  # a corrupt bucket must not index past the tables

    @triton.jit
    def _advance(ch, row, C: tl.constexpr, LANES: tl.constexpr):
        """(channel, row) LANES coefficients on, with no division (LANES may exceed C)."""
        ch += LANES % C
        row += LANES // C
        wrap = ch >= C
        return tl.where(wrap, ch - C, ch), row + wrap.to(tl.int32)

    @triton.jit
    def _rank(need, BALLOT: tl.constexpr):
        """-> (how many lanes before each lane are in `need`, how many are in all), both
        per lane. BALLOT (one warp of 32 lanes, one a thread, on a GPU): a warp vote and
        two population counts, in place of a five-round shuffle scan and a reduction."""
        flag = need.to(tl.int32)
        if BALLOT:
            below, total = tl.inline_asm_elementwise(
                asm="{ .reg .pred p; .reg .b32 b, m; setp.ne.b32 p, $2, 0; vote.sync.ballot.b32 b, p, 0xffffffff; "
                    "mov.u32 m, %lanemask_lt; and.b32 m, m, b; popc.b32 $0, m; popc.b32 $1, b; }",
                constraints="=r,=r,r", args=[flag], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            below = tl.cumsum(flag, 0) - flag
            total = tl.zeros_like(flag) + tl.sum(flag, 0)
        return below, total

    @triton.jit
    def _emit(x, need, ptr, out, BALLOT: tl.constexpr):
        """The lanes in `need` push their state's low 16 bits, in lane order, at `ptr`
        (the same in every lane)."""
        below, total = _rank(need, BALLOT)
        tl.store(out + ptr + below, (x & 0xFFFF).to(tl.int16), mask=need)
        return tl.where(need, x >> 16, x), ptr + total

    @triton.jit
    def _refill_both(x, nr, valid, ptr, start, words_ptr, bad, BALLOT: tl.constexpr):
        """After a token: the inverse of the encoder's two _emit calls (raw bits, then the
        token), from a stream read backwards from `ptr`. Both words load at once: whether
        the raw bits need a word too follows from x before any word is read (x < 2^16 takes
        one, and then x * 2^16 + w < 2^(16 + nr) exactly when x < 2^nr), so a step waits
        for one round of votes and loads, not two in a row. -> (x after the token's word,
        whether the raw bits take a word, that word, ptr, bad). `words_ptr`: uint16. The
        step's words all lie at or above its new `ptr` (the same in every lane): below the
        group's `start` (a corrupt stream), `bad` is set and nothing is read. Nothing above
        the group's end is ever read: `ptr` starts there and only goes down."""
        one = tl.full(x.shape, 1, tl.uint32)
        need1 = valid & (x < 65536)
        need2 = tl.where(need1, x < (one << nr), x < (one << (nr + 16)))
        below1, total1 = _rank(need1, BALLOT)
        below2, total2 = _rank(need2, BALLOT)
        blk = ptr - total1 - total2
        inside = blk >= start
        bad |= (~inside).to(tl.int32)
        w1 = tl.load(words_ptr + (ptr - total1 + below1), mask=need1 & inside, other=0)
        w2 = tl.load(words_ptr + (blk + below2), mask=need2 & inside, other=0)
        x = tl.where(need1, (x << 16) | w1.to(tl.uint32), x)
        return x, need2, w2.to(tl.uint32), blk, bad

    @triton.jit
    def _prefetch_l1(ptrs):
        """Ask L1 for the line at `ptrs` (the words a few steps on), without waiting for
        it; -> 0 (an inline asm must return something: or it into a flag to keep it)."""
        return tl.inline_asm_elementwise(asm="prefetch.global.L1 [$1]; mov.u32 $0, 0;", constraints="=r,l",
                                         args=[ptrs], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _symbol(sym_ptr, offs, lo, n):
        """One step's packed symbols (0 outside this group's steps and the carry)."""
        return tl.load(sym_ptr + offs, mask=(offs >= lo) & (offs < n), other=0)

    @triton.jit
    def _encode_step(x, ptr, s, offs, lo, n, fc_ptr, rcp_ptr, out, PB: tl.constexpr, BALLOT: tl.constexpr):
        """Push one step's symbols (`s`, packed; the step at `offs`) onto the lanes' states."""
        valid = (offs >= lo) & (offs < n)
        nr = ((s >> 14) & 15).to(tl.uint32)
        # raw bits first (the decoder pops them after the token): room for nr more bits?
        need = (nr > 0) & ((x >> (32 - tl.maximum(nr, 1))) != 0)
        x, ptr = _emit(x, need, ptr, out, BALLOT)
        x = (x << nr) | (s & 0x3FFF).to(tl.uint32)
        # then the token: frequency and cumulative frequency in one word
        key = s >> 18
        fc = tl.load(fc_ptr + key, mask=valid, other=1 << 16).to(tl.uint32)
        rcp = tl.load(rcp_ptr + key, mask=valid, other=1.0)
        f = tl.maximum(fc >> 16, 1)
        need = valid & ((x >> (32 - PB)) >= f)
        x, ptr = _emit(x, need, ptr, out, BALLOT)
        # x // f without an integer division: x * (1/f) in float64 is within 2^-19 of
        # the quotient (x < 2^32), whose fraction is 0 or at least 1/f >= 2^-14, so
        # adding 2^-16 and truncating gives it exactly.
        qt = (x.to(tl.float64) * rcp + 0.0000152587890625).to(tl.uint32)
        return tl.where(valid, (qt << PB) + (x - qt * f) + (fc & 0xFFFF), x), ptr

    @triton.jit
    def _encode_kernel(sym_ptr, fc_ptr, rcp_ptr, out_ptr, count_ptr, state_ptr, n_ptr, STEPS: tl.constexpr,
                       LANES: tl.constexpr, PB: tl.constexpr, BALLOT: tl.constexpr):
        """Steps run last to first, eight at a time: the next eight steps' symbols load
        while these eight are coded (loaded step by step, each step waited for a memory
        round trip: on an H100 that, not the instruction count, set the time; eight ahead
        against four: 0.125 against 0.137 ms for a delta message, 0.104 against 0.106 for a
        key message)."""
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        n = tl.load(n_ptr)
        out = out_ptr + g.to(tl.int64) * (2 * STEPS * LANES)
        x = tl.full((LANES,), 65536, tl.uint32)
        ptr = tl.zeros((LANES,), tl.int32)
        lo = g * STEPS * LANES
        offs = lo + (STEPS - 1) * LANES + lanes
        s0 = _symbol(sym_ptr, offs, lo, n)
        s1 = _symbol(sym_ptr, offs - LANES, lo, n)
        s2 = _symbol(sym_ptr, offs - 2 * LANES, lo, n)
        s3 = _symbol(sym_ptr, offs - 3 * LANES, lo, n)
        s4 = _symbol(sym_ptr, offs - 4 * LANES, lo, n)
        s5 = _symbol(sym_ptr, offs - 5 * LANES, lo, n)
        s6 = _symbol(sym_ptr, offs - 6 * LANES, lo, n)
        s7 = _symbol(sym_ptr, offs - 7 * LANES, lo, n)
        for _ in range(0, STEPS, 8):
            t0 = _symbol(sym_ptr, offs - 8 * LANES, lo, n)
            t1 = _symbol(sym_ptr, offs - 9 * LANES, lo, n)
            t2 = _symbol(sym_ptr, offs - 10 * LANES, lo, n)
            t3 = _symbol(sym_ptr, offs - 11 * LANES, lo, n)
            t4 = _symbol(sym_ptr, offs - 12 * LANES, lo, n)
            t5 = _symbol(sym_ptr, offs - 13 * LANES, lo, n)
            t6 = _symbol(sym_ptr, offs - 14 * LANES, lo, n)
            t7 = _symbol(sym_ptr, offs - 15 * LANES, lo, n)
            x, ptr = _encode_step(x, ptr, s0, offs, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s1, offs - LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s2, offs - 2 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s3, offs - 3 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s4, offs - 4 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s5, offs - 5 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s6, offs - 6 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            x, ptr = _encode_step(x, ptr, s7, offs - 7 * LANES, lo, n, fc_ptr, rcp_ptr, out, PB, BALLOT)
            s0, s1, s2, s3, s4, s5, s6, s7 = t0, t1, t2, t3, t4, t5, t6, t7
            offs -= 8 * LANES
        tl.store(count_ptr + g + lanes * 0, ptr, mask=lanes == 0)
        tl.store(state_ptr + g.to(tl.int64) * LANES + lanes, x.to(tl.int32, bitcast=True))

    @triton.jit
    def _decode_steps(x, ptr, bad, marks, f_min, offs, row, ch, cx, cx_next, start, n, words_ptr, row_base_ptr,
                      bucket_ptr, fc_ptr, slot_ptr, token_ptr, value_ptr, C: tl.constexpr, STEPS: tl.constexpr,
                      LANES: tl.constexpr, NB: tl.constexpr, PB: tl.constexpr, BALLOT: tl.constexpr,
                      PREFETCH: tl.constexpr, ESC: tl.constexpr, MASKED: tl.constexpr):
        """_decode_kernel's loop over one group's steps. MASKED: some of them lie past the
        carry's `n` symbols (the last groups); without it every step is in the carry and
        its masks and selects fold away (about 125 -> 114 instructions a step, sm_90).
        `fc_ptr`: the packed tables token-major (token * NB + context): the lanes of a
        warp, 32 channels with contexts of their own, mostly read a few small tokens, so
        their loads touch a few lines, not one a context."""
        for i in range(STEPS):
            if MASKED:
                valid = offs < n
            else:
                valid = tl.full((LANES,), 1, tl.int1)
            ch_next2, row_next2 = _advance(ch, row, C, LANES)
            cx_next2 = _bucket(row_next2, ch_next2, offs + 2 * LANES < n, row_base_ptr, bucket_ptr, NB)
            slot = x & ((1 << PB) - 1)
            t = tl.load(slot_ptr + cx * (1 << PB) + slot.to(tl.int32), mask=valid, other=0).to(tl.int32)
            fc = tl.load(fc_ptr + t * NB + cx, mask=valid, other=1 << 16).to(tl.uint32)
            info = tl.load(token_ptr + t, mask=valid, other=0)
            f = fc >> 16
            f_min = tl.minimum(f_min, f)  # 0: a slot of an empty table (a corrupt context)
            marks += (valid & (t == ESC)).to(tl.int32)
            f = tl.maximum(f, 1)
            x = tl.where(valid, (f * (x >> PB) + slot) - (fc & 0xFFFF), x)
            nr = (info >> 20).to(tl.uint32)
            x, need2, w2, ptr, bad = _refill_both(x, nr, valid, ptr, start, words_ptr, bad, BALLOT)
            if PREFETCH:
                bad |= _prefetch_l1(words_ptr + tl.maximum(ptr - PREFETCH, 0) + offs * 0)
            raw = (x & ((tl.full((LANES,), 1, tl.uint32) << nr) - 1)).to(tl.int32)
            x = x >> nr
            x = tl.where(need2, (x << 16) | w2, x)
            v = (info & 0xFFFFF) | (raw >> 1)
            q = tl.where((raw & 1) != 0, -v, v)
            tl.store(value_ptr + offs, q.to(tl.int16), mask=valid)  # an escape: 32768, as -32768
            offs += LANES
            cx, cx_next = cx_next, cx_next2
            ch, row = ch_next2, row_next2
        return x, ptr, bad, marks, f_min

    @any_size
    def _decode_kernel(words_ptr, start_ptr, count_ptr, state_ptr, total_ptr, row_base_ptr, bucket_ptr, fc_ptr, slot_ptr,
                       token_ptr, value_ptr, marks_ptr, bad_ptr, n, C: tl.constexpr, STEPS: tl.constexpr,
                       LANES: tl.constexpr, NB: tl.constexpr, PB: tl.constexpr, BALLOT: tl.constexpr,
                       PREFETCH: tl.constexpr, ESC: tl.constexpr):
        g = tl.program_id(0)
        lanes = tl.arange(0, LANES)
        total_words = tl.load(total_ptr).to(tl.int32)
        start = tl.load(start_ptr + g)
        end = start + tl.load(count_ptr + g)
        # the steps read only below where the group's words end: a count past the stream
        # (corrupt) is cut to it here, once, and the stream reads need no upper bound
        bad = tl.zeros((LANES,), tl.int32) + (end > total_words).to(tl.int32)
        ptr = tl.zeros((LANES,), tl.int32) + tl.minimum(end, total_words)
        x = tl.load(state_ptr + g.to(tl.int64) * LANES + lanes).to(tl.uint32, bitcast=True)
        marks = tl.zeros((LANES,), tl.int32)  # escapes met (the gpu codec checks them against its list)
        f_min = tl.full((LANES,), 1, tl.uint32)
        words_ptr = words_ptr.to(tl.pointer_type(tl.uint16))
        offs = g * STEPS * LANES + lanes
        # each lane's coefficient row and channel, moved on by LANES a step (no division
        # in the loop)
        row = offs // C
        ch = offs - row * C
        # what depends only on a step's position loads ahead, carried round the loop: the
        # table of the step after next. Loaded in the step that uses it, it (and the step
        # size, which the inverse now applies) were 26 % of the stalls on an H100 (a GPU
        # issues in order: a step waits for them even though its state does not).
        cx = _bucket(row, ch, offs < n, row_base_ptr, bucket_ptr, NB)
        ch, row = _advance(ch, row, C, LANES)
        cx_next = _bucket(row, ch, offs + LANES < n, row_base_ptr, bucket_ptr, NB)
        if (g + 1) * STEPS * LANES <= n:
            x, ptr, bad, marks, f_min = _decode_steps(x, ptr, bad, marks, f_min, offs, row, ch, cx, cx_next, start,
                                                      n, words_ptr, row_base_ptr, bucket_ptr, fc_ptr, slot_ptr,
                                                      token_ptr, value_ptr, C, STEPS, LANES, NB, PB, BALLOT,
                                                      PREFETCH, ESC, MASKED=False)
        else:
            x, ptr, bad, marks, f_min = _decode_steps(x, ptr, bad, marks, f_min, offs, row, ch, cx, cx_next, start,
                                                      n, words_ptr, row_base_ptr, bucket_ptr, fc_ptr, slot_ptr,
                                                      token_ptr, value_ptr, C, STEPS, LANES, NB, PB, BALLOT,
                                                      PREFETCH, ESC, MASKED=True)
        bad |= ((x != 65536) | (ptr != start) | (f_min == 0)).to(tl.int32)
        tl.atomic_or(bad_ptr + lanes * 0, bad, mask=bad != 0)
        tl.atomic_add(marks_ptr + lanes * 0, marks, mask=marks != 0)

    @triton.jit
    def _decode_tables_kernel(freq_ptr, fc_ptr, slot_ptr, ALPHA: tl.constexpr, PB: tl.constexpr,
                              BLOCK: tl.constexpr):
        """For context table program_id(0): BLOCK of its slots -> symbol (entropy.slot_table),
        and (the first block's program) its packed words (`packed_tables`'s, token-major:
        see _decode_steps)."""
        t = tl.program_id(0)
        if tl.program_id(1) == 0:  # token-major: the decoder's loads (see _decode_steps)
            j = tl.arange(0, 64)
            a = j < ALPHA
            freq = tl.load(freq_ptr + t * ALPHA + j, mask=a, other=0).to(tl.int32)
            tl.store(fc_ptr + j * tl.num_programs(0) + t, tl.where(a, (freq << 16) | (tl.cumsum(freq, 0) - freq), 0))
        slot = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        # the symbol of a slot: how many symbols end at or before it (unrolled: the
        # frequencies' loads go out together)
        sym = tl.zeros((BLOCK,), tl.int32)
        end = tl.load(freq_ptr + t * ALPHA).to(tl.int32) * 0
        for k in tl.static_range(ALPHA):
            end += tl.load(freq_ptr + t * ALPHA + k).to(tl.int32)
            sym += (end <= slot).to(tl.int32)
        tl.store(slot_ptr + t * (1 << PB) + slot, tl.where(sym < ALPHA, sym, 0).to(tl.uint8))

    @any_size
    def _gather_words_kernel(buf_ptr, count_ptr, out_ptr, CAP, BLOCK: tl.constexpr):
        """Group g's words to where the groups before it end: each program sums their
        counts itself (a few loads, in place of a cumulative sum's two kernels)."""
        g = tl.program_id(0)
        cnt = tl.load(count_ptr + g)
        before = tl.zeros((BLOCK,), tl.int64)
        for i in range(0, g, BLOCK):
            o = i + tl.arange(0, BLOCK)
            before += tl.load(count_ptr + o, mask=o < g, other=0).to(tl.int64)
        start = tl.sum(before, 0)
        for i in range(0, cnt, BLOCK):
            o = i + tl.arange(0, BLOCK)
            m = o < cnt
            tl.store(out_ptr + start + o, tl.load(buf_ptr + g.to(tl.int64) * CAP + o, mask=m), mask=m)


def _ballot(lanes: int) -> bool:
    """Whether the kernels count lanes by warp vote: one warp of 32 lanes, not interpreted."""
    return lanes == 32 and LANES_PER_WARP == 32 and not INTERPRETED


def pack_symbols(q: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Quantised values and their context tables (each (n,) integers) -> the encoder's
    packed int32 symbols, in torch ops; the gpu codec's quantiser kernel writes the same."""
    tok, nr, raw = reference_tokenize(q.to(torch.int64))
    return ((ctx.to(torch.int64) << 24) | (tok << KEY_SHIFT) | (nr << 14) | raw).to(torch.int32)


def packed_tables(freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_BUCKETS, ALPHABET) frequencies -> (N_BUCKETS * 64) int32 words freq << 16 | cum
    and float64 reciprocals 1 / freq (inf where a symbol is absent: never loaded, since
    every symbol coded has a frequency), indexed by a symbol's context * 64 + token."""
    tables = freq.shape[0]
    freq = freq.to(torch.int64)
    fc = torch.zeros(tables, TABLE_WIDTH, dtype=torch.int64, device=freq.device)
    fc[:, :ALPHABET] = (freq << 16) | cumulative(freq)
    rcp = torch.full((tables, TABLE_WIDTH), float("inf"), dtype=torch.float64, device=freq.device)
    rcp[:, :ALPHABET] = 1.0 / freq.to(torch.float64)
    return fc.to(torch.int32).reshape(-1), rcp.reshape(-1)


_CONSTANTS: dict = {}


def device_constant(name: str, device, make) -> torch.Tensor:
    """A table the kernels read, made by `make(device)` once per device: an upload in the
    middle of a decode would wait for the kernels queued before it, and a CUDA graph
    capture cannot hold one (the first decode of a shape runs eagerly, so the table
    exists before its capture)."""
    key = (name, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make(device)
    return _CONSTANTS[key]


def _token_table(device) -> torch.Tensor:
    """(64,) int32: a token's value with zero raw bits | its raw bit count << 20. The
    escape token's value is 32768 (no coded value reaches it): as int16, ESCAPE_MARK."""
    t = torch.arange(TABLE_WIDTH).clamp(max=ALPHABET - 1)
    value = torch.where(t == ESCAPE, -ESCAPE_MARK, detokenize(t, torch.zeros_like(t)))
    return (value | (token_raw_bits(t) << 20)).to(torch.int32).to(device)


def encode(symbols: torch.Tensor, n: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], geo,
           group_words: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """rANS-code packed symbols (`pack_symbols`; only the first `n`, a 0-d device tensor;
    geo sized for the buffer's length) with `tables` (`packed_tables`). Writes the words
    per group into `group_words` ((G,) int32) and the final states into `states` ((G *
    lanes,) int32 bit patterns), and -> the per-group word buffers (G, 2*steps*lanes)
    int16. No host round trip."""
    device = symbols.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    out = torch.empty(G, 2 * S * W, dtype=torch.int16, device=device)
    _encode_kernel[(G,)](symbols, *tables, out, group_words, states, n.to(torch.int32).reshape(1), STEPS=S, LANES=W,
                         PB=PROB_BITS, BALLOT=_ballot(W), num_warps=max(1, W // LANES_PER_WARP))
    return out


def gather_words(buf: torch.Tensor, counts: torch.Tensor, out: torch.Tensor) -> None:
    """The groups' word buffers back to back into `out` (int16, room for all of them):
    no host round trip, the caller reads the total later."""
    _gather_words_kernel[(counts.numel(),)](buf, counts, out, buf.shape[1], BLOCK=1024)


def group_starts(group_words: torch.Tensor) -> torch.Tensor:
    """Where each group's words start in the stream (int32): the decoder's `starts`."""
    return (torch.cumsum(group_words.to(torch.int64), 0) - group_words).to(torch.int32)


def decode(words: torch.Tensor, total_words: torch.Tensor, starts: torch.Tensor, group_words: torch.Tensor,
           states: torch.Tensor, buckets: torch.Tensor, row_bases: torch.Tensor, freq: torch.Tensor, geo,
           bad: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """Decode to the quantised values, (n,) int16: an escape's place holds ESCAPE_MARK
    (the value itself travels beside the words), and add how many there are to `marks`
    ((1,) int32, zero before). Not dequantised: half the bytes of float32 coefficients
    to write here and to read again (the gpu codec's inverse kernel applies the steps).
    `starts`: where each group's words start (`group_starts`, int32). `row_bases`: each
    coefficient row's class (gpu_layout.row_classes) times the channel count, int32: where
    its row of `buckets` starts. `words` may be longer than the stream: `total_words` (a
    1-element device tensor) says how much is. Corruption sets `bad` (a 1-element int32
    device tensor, zero before) instead of raising: the caller checks it once. The gpu
    codec makes the small inputs on the host and uploads them with the message: made
    here, they were a dozen small kernels a decode."""
    device = words.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    values = torch.empty(geo.n, dtype=torch.int16, device=device)
    if words.numel() == 0:
        words = torch.zeros(1, dtype=torch.int16, device=device)
    tables = freq.shape[0]
    fc = torch.empty(tables * TABLE_WIDTH, dtype=torch.int32, device=device)
    slots = torch.empty(tables << PROB_BITS, dtype=torch.uint8, device=device)
    _decode_tables_kernel[(tables, (1 << PROB_BITS) // SLOT_BLOCK)](freq.contiguous(), fc, slots, ALPHA=ALPHABET,
                                                                   PB=PROB_BITS, BLOCK=SLOT_BLOCK)
    _decode_kernel[(G,)](words, starts, group_words, states, total_words, row_bases, buckets, fc, slots,
                         device_constant("tokens", device, _token_table), values, marks, bad, geo.n, C=buckets.shape[1],
                         STEPS=S, LANES=W, NB=tables, PB=PROB_BITS, BALLOT=_ballot(W),
                         PREFETCH=0 if INTERPRETED else PREFETCH_WORDS, ESC=ESCAPE,
                         num_warps=max(1, W // LANES_PER_WARP))
    return values
