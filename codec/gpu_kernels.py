"""The `gpu` codec's fused backend: Triton kernels, no host round trip until the end.

Encode, for a (B, T, C) carry on a CUDA device (codec/gpu_reference.py is the same
format in torch ops, and the documentation of each stage):

1. statistics: channel medians (centre, spread) over sampled tokens, each token's
   centred and plain squared norm (one read); the loud tokens are picked on the device
   (gpu_layout.find_loud, in one kernel: find_loud_fused);
2. step fit without host syncs: 16 candidate steps spaced by sqrt(2), then 16 spaced by
   2^(1/32) around the best, each pass on a sample of the (tile, channel group)
   programs. Each try recomputes the 8x8 DCT from the input (cheaper than storing
   float32 coefficients; for a bf16 carry as bf16 tensor-core products, _forward_tile)
   and quantises with every candidate; the largest step within the error target wins,
   picked on the device;
3. quantise: the symbols (each value's token, raw bits and context table, packed in one
   int32 for the rANS encoder), the escapes, the (context, token) keys of 1 row in 16 or
   64 (HIST_SHARE) for the rANS tables, and the temporal reference when there is one;
4. rANS (codec/entropy_triton.py), and the message packed on the device (the kernels
   write the fixed-size parts in place, then the words go back to back); one small copy
   of the sizes comes back, then the used prefix of the message.

Between the big kernels, small ones do the glue (the fit's candidates and choice, the
context tables, the escapes' order): each torch op costs a launch and ~2 us of GPU time,
and an encode had ~150 of them.

Decode: rANS straight to the int16 values (a mark where an escape goes), then one pass
that applies the steps, puts the escapes in, adds the temporal reference, runs the
inverse DCT, adds the centre and writes the output dtype. Checks of the message's
contents collect in one device flag, read once.

codec/gpu_graphs.py runs both as CUDA graphs, one per shape: launched one by one, an
encode's ~70 launches cost more host time than the GPU spends on them.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch

from . import entropy_triton
from .entropy_triton import any_size, device_constant
from .entropy import ALPHABET, ESCAPE, EXACT_TOKENS, MAX_EXP, PROB_SCALE, Geometry
from .gpu_layout import (BUCKET_OFFSET, FINEST_STEP, LOUD_CLASS, LOUD_FACTOR, N_BUCKETS, N_CLASSES, PRED_MAX,
                         REF_DTYPE, ROWS_PER_BLOCK, STATS_ROWS, TEXT_CLASS, Layout, aligned, bf16_as_float32,
                         channel_centre, channel_spread, dct2_bf16_pieces, dct2_matrix, dct2_piece_sums, row_classes,
                         sample_rows)

try:
    import triton
    import triton.language as tl
    from .entropy_triton import ESCAPE_MARK, tokenize
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

CANDIDATES = 16  # steps tried per fit pass
COARSE_RATIO = 2 ** 0.5  # spacing of the first pass's candidates
FINE_RATIO = 2 ** (1 / 32)  # ... and of the second's
# Share of the (tile, channel group) programs the two fit passes look at (the error bound
# the header states comes from the chosen step, not from the sample), and of the rows of
# every tile the symbol histogram (the rANS tables) looks at. On the corpus (H200): tables from every
# symbol 6.667x, from 1 row in 8 or 16 6.662x, from 1 program in 13 6.355x (whole
# programs are not a fair sample).
COARSE_SHARE = 64
FINE_SHARE = 16
# The histogram's share (a power of two up to 64: rows of each 64-row tile, one in the
# share): 1 in 64 where that still samples HIST_SAMPLE symbols, else 1 in 16. On the
# corpus (H100) 1 in 16 / 32 / 64 gave 6.657 / 6.656 / 6.655x and took torch.histc 0.116 /
# 0.083 / 0.061 ms on a 56.6 MB carry; on a small one (1088 x 256) 6.80 / 6.68 / 6.63x.
# HIST_SHARE, when set, overrides the choice (bench/gpu_codec_check.py).
HIST_SHARE: int | None = None
HIST_SAMPLE = 1 << 18
# The sampled keys are counted into this many histograms (_histogram_kernel), summed by
# the tables kernel: they pile onto a few bins (token 0 of the busy contexts), and atomics
# on one address wait for each other. On an H100 (56.6 MB carry, key message): 1 / 4 / 16
# / 32 histograms took 0.075 / 0.022 / 0.013 / 0.009 ms, torch.histc 0.061 (0.091 delta).
HIST_COPIES = 32
HIST_BLOCK = 1024  # keys per histogram program
# Channels per tile, and channel blocks per program. Measured on an H200 (bench/NOTES.md):
# one block of 32 per program runs the fit and quantiser passes 5-25x faster than four of
# 64 (the loop over blocks keeps more live registers than the SM has).
CHANNEL_BLOCK = 32
CHUNKS = 1
HIST_BINS = N_BUCKETS * 64  # (context, token) bins; token 63 of each context is unused
# Escapes the fused encoder collects (more: the torch path). Values >= 2^15 steps are
# rare; the collected positions are sorted (atomics fill them in any order, and the bytes
# must not depend on it) in one program, which at 65536 would not fit.
ESCAPE_CAPACITY = 4096
# tf32x3: three TF32 tensor-core products, about float32 accuracy (plain TF32 would add
# a 5e-4 relative error to every coefficient).
PRECISION = "tf32x3"
# The step fit only estimates errors and coefficient sizes: one TF32 product does.
FIT_PRECISION = "tf32"
# The decoder's inverse transform: one TF32 product. It makes the output only (the
# temporal reference is kept before it, so the two ends stay in step whatever this is).
# bench/inverse_precision.py, H200, rel_err 0.03: the inverse kernel 0.107 -> 0.095 ms
# (key), 0.128 -> 0.116 (delta); the decode's rel_l2 0.0298 / 0.0297 either way, its
# output 1.3e-3 (rel_l2) from the tf32x3 one's, about what rounding it to bf16 moves it.
INVERSE_PRECISION = "tf32"
# A bf16 carry (the usual one) takes the forward DCT as bf16 products instead
# (_forward_tile): three of them (the float32 matrix whole) to quantise, two (16 bits of
# it) for the fit.
SPLIT = 3
FIT_SPLIT = 2
NUM_WARPS = 4  # per tile program
# The quantiser's registers, capped (None: the compiler's choice, 144 on an H100 with
# Triton 3.6: 3 blocks of 4 warps a multiprocessor). At 128 a fourth block fits and a few
# values spill to local memory (232 bytes): quantiser 0.197 -> 0.179 ms (temporal key),
# 0.225 -> 0.201 ms (delta); 96: 0.176 / 0.215, 80: 0.197 / 0.286 (H100, bench/NOTES.md).
QUANTISE_MAXNREG: int | None = 128
# Programs per multiprocessor of the persistent inverse kernel (bench/tile_sweep.py,
# H100: 4 / 8 / 16 / 32 took 0.104 / 0.102 / 0.104 / 0.106 ms, one program a tile 0.117);
# 0: one program a tile.
PROGRAMS_PER_SM = 8
# Channels and warps per centre-and-spread program (bench/centre_spread_sweep.py, H100:
# 8 and 1 took 0.061 ms for 512 x 6144 rows, 4 and 4 0.187 ms, 16 and 4 0.378 ms).
MEDIAN_CHANNELS = 8
MEDIAN_WARPS = 1
# The loud-token search (_loud_kernel): one program, image tokens this many at a time.
LOUD_BLOCK = 1024
LOUD_WARPS = 8
GLUE_CHANNELS = 256  # channels per program of the per-channel glue kernels (step fit, buckets)


def available(device: torch.device) -> bool:
    return entropy_triton.available(device)


if triton is not None:

    # The slots of an address table (gpu_graphs.AddressTable): the carry an encoder reads,
    # the stream's reference, the new reference, a decoder's output.
    SLOT_X = tl.constexpr(0)
    SLOT_REF = tl.constexpr(1)
    SLOT_NEW_REF = tl.constexpr(2)
    SLOT_OUT = tl.constexpr(3)
    # Triton's interpreter multiplies bf16 matrices as their 16-bit patterns (3.9): there
    # the pieces and the carry go to float32 first, which gives the same (exact) products.
    BF16_DOT = tl.constexpr(not entropy_triton.INTERPRETED)

    @triton.jit
    def _to_ref(v):
        """float32 -> bf16 (gpu_layout.REF_DTYPE), to nearest, ties to even, as torch rounds:
        spelled out because Triton's interpreter truncates, and the two ends (and the two
        backends) must keep the same reference bit for bit. For finite values."""
        bits = v.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _through(table_ptr, slot: tl.constexpr, DT: tl.constexpr):
        """A slot of an address table as a pointer to DT: how a captured graph reaches
        tensors that change from call to call. The table holds only 16-byte aligned
        addresses, and saying so keeps the loads and stores vectorised."""
        return tl.multiple_of(tl.load(table_ptr + slot).to(tl.pointer_type(DT)), 16)

    @triton.jit
    def _rows(tile, T, N_TXT, H, W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS, FIXED_ROWS, n_loud,
              loud_idx_ptr, TEXT: tl.constexpr, LOUD: tl.constexpr):
        """The 64 rows of one tile: text rows, one 8x8 block, or loud rows.

        -> (coefficient row, row exists, class, carry row to read (clamped into the grid:
        replicate padding), carry row this tile owns on output (-1: none), flat image
        token (-1 for text))."""
        r = tl.arange(0, 64)
        if tile < TEXT_TILES:
            row = tile * 64 + r
            ok = row < TEXT_ROWS
            tb = row // N_TXT
            xrow = tb * T + (row - tb * N_TXT)
            sym = row
            cls = tl.full((64,), TEXT, tl.int32)
            own = tl.where(ok, xrow, -1)
            img = tl.full((64,), -1, tl.int32)
        elif tile < TEXT_TILES + BLOCK_TILES:
            bt = tile - TEXT_TILES
            bj = bt % WB
            bi = (bt // WB) % HB
            bb = bt // (WB * HB)
            yy = bi * 8 + r // 8
            xx = bj * 8 + r % 8
            yc = tl.minimum(yy, H - 1)
            xc = tl.minimum(xx, W - 1)
            img = (bb * H + yc) * W + xc
            xrow = bb * T + N_TXT + yc * W + xc
            sym = TEXT_ROWS + bt * 64 + r
            ok = r < 64
            s = r // 8 + r % 8
            cls = (s >= 1).to(tl.int32) + (s >= 3).to(tl.int32) + (s >= 6).to(tl.int32) + (s >= 10).to(tl.int32)
            own = tl.where((yy < H) & (xx < W), xrow, -1)
        else:
            k = (tile - TEXT_TILES - BLOCK_TILES) * 64 + r
            ok = k < n_loud
            img = tl.load(loud_idx_ptr + k, mask=ok, other=0).to(tl.int32)
            lb = img // (H * W)
            xrow = lb * T + N_TXT + (img - lb * H * W)
            sym = FIXED_ROWS + k
            cls = tl.full((64,), LOUD, tl.int32)
            own = tl.where(ok, xrow, -1)
        return sym, ok, cls, xrow, own, img

    @triton.jit
    def _load_forward(d2_ptr, pieces_ptr, sums_ptr, SPLIT: tl.constexpr):
        """The forward block DCT as _forward_tile takes it: (float32 matrix, -, -, -) for
        SPLIT 0; else its first SPLIT bf16 pieces (gpu_layout.dct2_bf16_pieces; the ones
        not used repeat the first) and the row sums of their total."""
        r = tl.arange(0, 64)
        at = r[:, None] * 64 + r[None, :]
        # (one return at the end: Triton compiles no return inside a branch for a GPU,
        # though its interpreter runs one)
        if SPLIT == 0:
            hi = tl.load(d2_ptr + at)
            sums = tl.zeros((64,), tl.float32)
        else:
            hi = tl.load(pieces_ptr + at)
            sums = tl.load(sums_ptr + (SPLIT - 1) * 64 + r)
        mid = hi
        lo = hi
        if SPLIT >= 2:
            mid = tl.load(pieces_ptr + 4096 + at)
        if SPLIT >= 3:
            lo = tl.load(pieces_ptr + 8192 + at)
        return hi, mid, lo, sums

    @triton.jit
    def _forward_tile(x_ptr, center_ptr, loud_mask_ptr, dct, tile, block, ok, xrow, img, TEXT_TILES, BLOCK_TILES,
                      C: tl.constexpr, CB: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
        """Centred coefficients of one tile's rows for channel block `block` (rows that do
        not exist: 0). `dct`: _load_forward's. -> (coefficients, channels, channel exists,
        element exists).

        SPLIT (a bf16 carry): the block DCT as SPLIT bf16 tensor-core products of the
        uncentred carry, smallest piece first, less the centre times the pieces' row sums.
        Against centring in float32 and three TF32 products (PREC, for other dtypes) this
        stages half the bytes for the tensor cores and splits nothing per tile."""
        d_hi, d_mid, d_lo, sums = dct
        ch = block * CB + tl.arange(0, CB)
        cm = ch < C
        m = ok[:, None] & cm[None, :]
        xv = tl.load(x_ptr + xrow.to(tl.int64)[:, None] * C + ch[None, :], mask=m, other=0.0)
        centre = tl.load(center_ptr + ch, mask=cm, other=0.0)
        if (tile >= TEXT_TILES) & (tile < TEXT_TILES + BLOCK_TILES):
            loud = tl.load(loud_mask_ptr + img) != 0  # a loud token's own row carries it
            if SPLIT == 0:
                coef = tl.where(m & (loud[:, None] == 0), xv.to(tl.float32) - centre[None, :], 0.0)
                coef = tl.dot(d_hi, coef, input_precision=PREC)
            else:  # the centre is a bf16 value (gpu_layout.channel_centre): a loud row becomes it
                xb = tl.where(loud[:, None], centre.to(tl.bfloat16)[None, :], xv)
                if not BF16_DOT:
                    xb = xb.to(tl.float32)
                    d_hi, d_mid, d_lo = d_hi.to(tl.float32), d_mid.to(tl.float32), d_lo.to(tl.float32)
                coef = tl.zeros((64, CB), tl.float32)
                if SPLIT >= 3:
                    coef = tl.dot(d_lo, xb, coef)
                if SPLIT >= 2:
                    coef = tl.dot(d_mid, xb, coef)
                coef = tl.dot(d_hi, xb, coef) - sums[:, None] * centre[None, :]
        else:
            coef = tl.where(m, xv.to(tl.float32) - centre[None, :], 0.0)
        return coef, ch, cm, m

    @any_size
    def _fit_kernel(x_ptr, center_ptr, loud_mask_ptr, loud_idx_ptr, n_loud_ptr, d2_ptr, pieces_ptr, sums_ptr, ref_ptr,
                    pred_ptr, steps_ptr, inv_ptr, err_ptr, sq_ptr, count_ptr, STRIDE, N_PROGRAMS, GROUPS, T, N_TXT, H,
                    W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS, FIXED_ROWS, table_ptr, C: tl.constexpr,
                    CB: tl.constexpr, CHUNKS: tl.constexpr, K: tl.constexpr, HAS_REF: tl.constexpr,
                    SQ: tl.constexpr, PRED: tl.constexpr, TEXT: tl.constexpr, LOUD: tl.constexpr,
                    NCLS: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, THROUGH: tl.constexpr,
                    X_DT: tl.constexpr):
        """Squared error of every candidate step over this program's tile and channels
        (one partial sum per program and candidate: no contended atomics) of the change
        from the reference times its weight (at pred_ptr; with HAS_REF); with SQ, each
        (class, channel)'s sum of squared coefficients too. PRED (with HAS_REF): the
        weight's sums instead, the coefficients' dot product with the reference's and the
        reference's sum of squares, in the first two of the program's K slots. THROUGH:
        the carry and the reference come from the address table."""
        if THROUGH:
            x_ptr = _through(table_ptr, SLOT_X, X_DT)
            ref_ptr = _through(table_ptr, SLOT_REF, tl.bfloat16)
        pid = tl.program_id(0)
        p = (pid * STRIDE) % N_PROGRAMS
        tile = p // GROUPS
        n_loud = tl.load(n_loud_ptr)
        sym, ok, cls, xrow, own, img = _rows(tile, T, N_TXT, H, W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS,
                                             FIXED_ROWS, n_loud, loud_idx_ptr, TEXT, LOUD)
        dct = _load_forward(d2_ptr, pieces_ptr, sums_ptr, SPLIT)
        kk = tl.arange(0, K)
        # per candidate and row: one reduction across the program's warps at the end, not
        # one per candidate
        acc = tl.zeros((K, 64), tl.float32)
        for j in range(CHUNKS):
            coef, ch, cm, m = _forward_tile(x_ptr, center_ptr, loud_mask_ptr, dct, tile, (p % GROUPS) * CHUNKS + j,
                                            ok, xrow, img, TEXT_TILES, BLOCK_TILES, C, CB, PREC, SPLIT)
            if HAS_REF:
                ref = tl.load(ref_ptr + sym.to(tl.int64)[:, None] * C + ch[None, :], mask=m, other=0.0).to(tl.float32)
                if PRED:
                    acc += tl.where((kk == 0)[:, None], tl.sum(coef * ref, 1)[None, :],
                                    tl.where((kk == 1)[:, None], tl.sum(ref * ref, 1)[None, :], 0.0))
                else:
                    coef -= tl.load(pred_ptr) * ref
            if SQ:  # sampled: each cell's sum of squares and how many rows it saw
                sq = coef * coef
                for c in tl.static_range(NCLS):
                    in_class = ok & (cls == c)
                    n_rows = tl.sum(in_class.to(tl.float32), 0)
                    if n_rows > 0:
                        tl.atomic_add(sq_ptr + c * C + ch, tl.sum(tl.where(in_class[:, None], sq, 0.0), 0), mask=cm)
                        tl.atomic_add(count_ptr + c * C + ch, tl.zeros((CB,), tl.float32) + n_rows, mask=cm)
            for k in tl.static_range(K if not PRED else 0):
                s = tl.load(steps_ptr + k * C + ch, mask=cm, other=1.0)
                inv = tl.load(inv_ptr + k * C + ch, mask=cm, other=1.0)
                qf = tl.floor(coef * inv[None, :] + 0.5)
                e = tl.where(tl.abs(qf) >= 32768.0, 0.0, coef - qf * s[None, :])
                acc += tl.where((kk == k)[:, None], tl.sum(e * e, 1)[None, :], 0.0)
        tl.store(err_ptr + pid.to(tl.int64) * K + kk, tl.sum(acc, 1))

    @triton.jit
    def _column_sums(part_ptr, n_rows, K: tl.constexpr):
        """The K column sums of a (n_rows, K) float32 array of per-program partial sums, in
        float64 (as torch's sum(0, dtype=float64) of it, to rounding)."""
        kk = tl.arange(0, K)
        acc = tl.zeros((64, K), tl.float64)
        for start in range(0, n_rows, 64):
            r = start + tl.arange(0, 64)
            acc += tl.load(part_ptr + r.to(tl.int64)[:, None] * K + kk[None, :], mask=(r < n_rows)[:, None],
                           other=0.0).to(tl.float64)
        return tl.sum(acc, 0)

    @any_size
    def _weight_kernel(part_ptr, n_rows, out_ptr, PRED_MAX: tl.constexpr, K: tl.constexpr):
        """gpu_layout.prediction_weight from the weight pass's partial sums (its first two
        columns: the coefficients' dot product with the reference's, the reference's sum
        of squares): about ten small torch ops in one kernel."""
        kk = tl.arange(0, K)
        sums = _column_sums(part_ptr, n_rows, K)
        cross = tl.sum(tl.where(kk == 0, sums, 0.0), 0)
        ref_sq = tl.sum(tl.where(kk == 1, sums, 0.0), 0)
        fitted = tl.where(ref_sq > 0, cross / tl.where(ref_sq > 0, ref_sq, 1.0), 1.0)
        fitted = tl.where(tl.abs(fitted) < float("inf"), fitted, 1.0)  # (a NaN compares false too)
        fitted = tl.minimum(tl.maximum(fitted, 0.0), PRED_MAX)
        tl.store(out_ptr, _to_ref(fitted.to(tl.float32)).to(tl.float32))

    @any_size
    def _candidates_kernel(err_ptr, n_err, scale, rel_err, tot_sq_ptr, twelve_over_n, prev_ptr, ratios_ptr, spread_ptr,
                           floor, cand_ptr, steps_ptr, inv_ptr, out_ptr, C, K: tl.constexpr, CB: tl.constexpr,
                           MODE: tl.constexpr, FINEST: tl.constexpr):
        """The step fit's glue for CB channels, on the device. MODE 0: the first pass's K
        candidate steps (ratios around the step that gives `rel_err` on white data; the
        carry's sum of squares times 12 / its size is that step's square / rel_err^2); 1: the
        second pass's (ratios around the first pass's best); 2: the chosen step (the second
        pass's best; row 0 only, its channel steps also to `out` in bf16). Each with its
        per-channel steps (K, C) and their reciprocals. `err`: the previous pass's squared error per candidate over
        its sample as (n_err, K) partial sums, `scale` times that over the whole carry; `prev`: its candidates."""
        ch = tl.program_id(0) * CB + tl.arange(0, CB)
        cm = ch < C
        kk = tl.arange(0, K)
        tot_sq = tl.load(tot_sq_ptr)
        if MODE == 0:
            base = tl.sqrt(tot_sq * twelve_over_n).to(tl.float32) * rel_err
        else:
            # the largest candidate within the target (they ascend), else the smallest
            ok = _column_sums(err_ptr, n_err, K) * scale <= (rel_err * rel_err) * tot_sq
            best = tl.maximum(tl.max(tl.where(ok, kk + 1, 0), 0) - 1, 0)
            base = tl.sum(tl.where(kk == best, tl.load(prev_ptr + kk), 0.0), 0)
        if MODE == 2:
            cand = tl.zeros((K,), tl.float32) + base
        else:  # bf16 values (gpu_layout.round_step)
            cand = (base * tl.load(ratios_ptr + kk)).to(tl.bfloat16).to(tl.float32)
        # gpu_layout.channel_floors and channel_steps: floor x spread truncated to bf16
        sp = tl.load(spread_ptr + ch, mask=cm, other=0.0)
        bound = (floor * sp).to(tl.int32, bitcast=True) & -65536
        floors = tl.where((sp > 0) & (floor > 0), bound.to(tl.float32, bitcast=True), float("inf"))
        steps = tl.minimum(cand[:, None], tl.maximum(floors[None, :], cand[:, None] * FINEST))
        inv = tl.math.div_rn(tl.full((K, CB), 1.0, tl.float32), steps)
        rows = K if MODE < 2 else 1
        at = kk[:, None] * C + ch[None, :]
        m = (kk < rows)[:, None] & cm[None, :]
        tl.store(steps_ptr + at, steps, mask=m)
        tl.store(inv_ptr + at, inv, mask=m)
        if MODE == 2:
            tl.store(out_ptr + at, steps.to(tl.bfloat16), mask=m)  # exact: bf16 values
        if tl.program_id(0) == 0:
            tl.store(cand_ptr + kk, cand, mask=kk < rows)

    @any_size
    def _buckets_kernel(sq_ptr, count_ptr, steps_ptr, bucket_ptr, used_ptr, C, NCLS: tl.constexpr,
                        CLS_BLOCK: tl.constexpr, CB: tl.constexpr, OFFSET: tl.constexpr, NB: tl.constexpr):
        """gpu_layout.context_buckets for CB channels of every class, and which context
        tables some cell uses (used[b] = 1)."""
        ch = tl.program_id(0) * CB + tl.arange(0, CB)
        cls = tl.arange(0, CLS_BLOCK)
        m = (cls < NCLS)[:, None] & (ch < C)[None, :]
        at = cls[:, None] * C + ch[None, :]
        rows = tl.maximum(tl.load(count_ptr + at, mask=m, other=0.0), 1.0)
        rms = tl.sqrt(tl.load(sq_ptr + at, mask=m, other=0.0) / rows)
        step = tl.load(steps_ptr + ch, mask=ch < C, other=1.0)
        b = tl.floor(2 * tl.log2(rms / step[None, :] + 1e-30) + 0.5) + OFFSET
        b = tl.minimum(tl.maximum(b, 0.0), NB - 1).to(tl.int32)
        tl.store(bucket_ptr + at, b.to(tl.uint8), mask=m)
        tl.store(used_ptr + b, tl.full((CLS_BLOCK, CB), 1, tl.int32), mask=m)

    @any_size
    def _histogram_kernel(key_ptr, n, hist_ptr, COPIES, BINS: tl.constexpr, BLOCK: tl.constexpr):
        """The sampled (context, token) keys counted, program p into histogram p % COPIES
        (see HIST_COPIES); keys < 0 (rows without a symbol) are not counted."""
        p = tl.program_id(0)
        i = p * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + i, mask=i < n, other=-1)
        tl.atomic_add(hist_ptr + (p % COPIES) * BINS + key, 1, mask=(key >= 0) & (key < BINS), sem="relaxed")

    @any_size
    def _tables_kernel(hist_ptr, copies, used_ptr, share, freq_ptr, fc_ptr, rcp_ptr, ALPHA: tl.constexpr,
                       SCALE: tl.constexpr, BINS: tl.constexpr):
        """One context table from the sampled histograms (`copies` of them, summed), as
        entropy.normalize_counts and entropy_triton.packed_tables make it: the frequencies
        (int16, for the message) and the encoder's packed words and reciprocals. A table
        some cell uses gives every symbol a frequency (one the sample missed must stay
        codable)."""
        t = tl.program_id(0)
        j = tl.arange(0, 64)
        a = j < ALPHA
        counts = tl.zeros((64,), tl.int64)
        for c in range(copies):
            counts += tl.load(hist_ptr + c * BINS + t * 64 + j, mask=a, other=0)
        counts = tl.where(a & (tl.load(used_ptr + t) != 0), counts * share + 1, 0)
        total = tl.sum(counts, 0)
        freq = counts * SCALE // tl.maximum(total, 1)
        freq = tl.where((counts > 0) & (freq == 0), 1, freq)
        deficit = tl.where(total > 0, SCALE - tl.sum(freq, 0), 0)
        freq += tl.where(j == tl.argmax(freq, 0, tie_break_left=True), deficit, 0)
        tl.store(freq_ptr + t * ALPHA + j, freq.to(tl.int16), mask=a)
        cum = tl.cumsum(freq, 0) - freq
        tl.store(fc_ptr + t * 64 + j, tl.where(a, (freq << 16) | cum, 0).to(tl.int32))
        rcp = 1.0 / tl.maximum(freq, 1).to(tl.float64)
        tl.store(rcp_ptr + t * 64 + j, tl.where(a & (freq > 0), rcp, float("inf")))

    @any_size
    def _quantise_kernel(x_ptr, center_ptr, loud_mask_ptr, loud_idx_ptr, n_loud_ptr, d2_ptr, pieces_ptr, sums_ptr,
                         ref_ptr, pred_ptr, new_ref_ptr, steps_ptr, inv_ptr, bucket_ptr, sym_ptr, key_ptr,
                         esc_count_ptr, esc_pos_ptr, esc_val_ptr, ESC_CAP, SAMPLE_SHIFT, GROUPS, T, N_TXT, H, W, HB, WB,
                         TEXT_TILES, BLOCK_TILES, TEXT_ROWS, FIXED_ROWS, table_ptr, C: tl.constexpr, CB: tl.constexpr,
                         CHUNKS: tl.constexpr, HAS_REF: tl.constexpr, WRITE_REF: tl.constexpr, TEXT: tl.constexpr,
                         LOUD: tl.constexpr, EXACT: tl.constexpr, MAXE: tl.constexpr, ESC: tl.constexpr,
                         PREC: tl.constexpr, SPLIT: tl.constexpr, THROUGH: tl.constexpr, X_DT: tl.constexpr):
        """THROUGH: the carry, the reference and the new reference come from the address
        table (at table_ptr)."""
        if THROUGH:
            x_ptr = _through(table_ptr, SLOT_X, X_DT)
            ref_ptr = _through(table_ptr, SLOT_REF, tl.bfloat16)
            new_ref_ptr = _through(table_ptr, SLOT_NEW_REF, tl.bfloat16)
        p = tl.program_id(0)
        tile = p // GROUPS
        n_loud = tl.load(n_loud_ptr)
        sym, ok, cls, xrow, own, img = _rows(tile, T, N_TXT, H, W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS,
                                             FIXED_ROWS, n_loud, loud_idx_ptr, TEXT, LOUD)
        dct = _load_forward(d2_ptr, pieces_ptr, sums_ptr, SPLIT)
        for j in range(CHUNKS):
            coef, ch, cm, m = _forward_tile(x_ptr, center_ptr, loud_mask_ptr, dct, tile, (p % GROUPS) * CHUNKS + j,
                                            ok, xrow, img, TEXT_TILES, BLOCK_TILES, C, CB, PREC, SPLIT)
            at = sym.to(tl.int64)[:, None] * C + ch[None, :]
            if HAS_REF:  # the weight is a bf16 value: its product with the reference is exact
                ref = tl.load(ref_ptr + at, mask=m, other=0.0).to(tl.float32) * tl.load(pred_ptr)
                coef -= ref
            s = tl.load(steps_ptr + ch, mask=cm, other=1.0)
            inv = tl.load(inv_ptr + ch, mask=cm, other=1.0)
            qf = tl.floor(coef * inv[None, :] + 0.5)
            esc = m & (tl.abs(qf) >= 32768.0)
            q = tl.where(esc, -32768, qf.to(tl.int32))
            # the symbols, packed for the rANS encoder (entropy_triton.pack_symbols)
            tok, nr, raw = tokenize(q, EXACT, MAXE, ESC)
            b = tl.load(bucket_ptr + cls[:, None] * C + ch[None, :], mask=m, other=0).to(tl.int32)
            tl.store(sym_ptr + at, (b << 24) | (tok << 18) | (nr << 14) | raw, mask=m)
            recon = tl.where(esc, coef, qf * s[None, :])
            if WRITE_REF:
                if HAS_REF:
                    recon += ref
                tl.store(new_ref_ptr + at, _to_ref(recon), mask=m)
            # (the test first: the masked atomics alone cost more, 0.204 -> 0.231 ms on an H100)
            if tl.sum(tl.sum(esc.to(tl.int32), 1), 0) > 0:
                slot = tl.atomic_add(esc_count_ptr + tl.zeros((64, CB), tl.int32), 1, mask=esc)
                keep = esc & (slot < ESC_CAP)
                tl.store(esc_pos_ptr + slot, at, mask=keep)
                tl.store(esc_val_ptr + slot, coef, mask=keep)
            # The rANS tables come from a sample: one in 2^SAMPLE_SHIFT of the 64 rows of
            # every tile write their (context, token) keys for _histogram_kernel: rows r = v
            # (mod 2^SAMPLE_SHIFT), v turning with the tile and channel group, so every
            # frequency band and channel is sampled alike. A sample of whole programs (1/13)
            # cost 5 % of the ratio; tl.histogram over 2048 bins took 4 ms for the whole
            # carry. A shift and a mask, not // and % by a runtime period: those compiled to
            # a division subroutine for each of a thread's 16 elements (sm_90).
            r = tl.arange(0, 64)
            period = 1 << SAMPLE_SHIFT
            v = (tile + p % GROUPS) & (period - 1)
            at_key = ((p * CHUNKS + j) * (64 >> SAMPLE_SHIFT) + (r >> SAMPLE_SHIFT))[:, None] * CB + \
                tl.arange(0, CB)[None, :]
            tl.store(key_ptr + at_key, tl.where(m, b * 64 + tok, -1), mask=((r & (period - 1)) == v)[:, None])

    @any_size
    def _meta_kernel(count_ptr, G, esc_count_ptr, n_loud_ptr, step_ptr, tot_sq_ptr, pred_ptr, loud_idx_ptr, n_idx,
                     meta_ptr, BLOCK: tl.constexpr):
        """The sizes and flags an encode sends back, as int64 (finish_encode reads them):
        the rANS words of all G groups, the escapes, the loud tokens' count, the step's,
        the carry's sum of squares' and the weight's bits, then the n_idx loud indices.
        One program: these were eight small kernels."""
        total = tl.zeros((BLOCK,), tl.int64)
        for start in range(0, G, BLOCK):
            g = start + tl.arange(0, BLOCK)
            total += tl.load(count_ptr + g, mask=g < G, other=0).to(tl.int64)
        j = tl.arange(0, 8)
        head = tl.where(j == 0, tl.sum(total, 0), tl.load(esc_count_ptr).to(tl.int64))
        head = tl.where(j == 2, tl.load(n_loud_ptr).to(tl.int64), head)
        head = tl.where(j == 3, tl.load(step_ptr).to(tl.int32, bitcast=True).to(tl.int64), head)
        head = tl.where(j == 4, tl.load(tot_sq_ptr).to(tl.int64, bitcast=True), head)
        head = tl.where(j == 5, tl.load(pred_ptr).to(tl.int32, bitcast=True).to(tl.int64), head)
        tl.store(meta_ptr + j, head, mask=j < 6)
        for start in range(0, n_idx, BLOCK):
            k = start + tl.arange(0, BLOCK)
            tl.store(meta_ptr + 6 + k, tl.load(loud_idx_ptr + k, mask=k < n_idx), mask=k < n_idx)

    @triton.jit
    def _sort_escapes_kernel(count_ptr, pos_ptr, val_ptr, pos_out_ptr, val_out_ptr, CAP: tl.constexpr):
        """The escapes the quantiser collected (its atomics fill the first `count` slots in
        any order) by position, values alongside, in one program that does nothing when
        there are none (the usual case: torch's sort of the whole buffer took 0.033 ms)."""
        n = tl.minimum(tl.load(count_ptr), CAP)
        if n > 0:
            i = tl.arange(0, CAP)
            filled = i < n
            # position and slot in one key: positions are below 2^40, slots below CAP
            key = tl.where(filled, tl.load(pos_ptr + i, mask=filled, other=0), 1 << 50) * CAP + i
            key = tl.sort(key)
            slot = (key % CAP).to(tl.int32)
            tl.store(pos_out_ptr + i, key // CAP, mask=filled)
            tl.store(val_out_ptr + i, tl.load(val_ptr + slot, mask=filled, other=0.0), mask=filled)

    @any_size
    def _escape_rows_kernel(pos_ptr, n_esc_ptr, value_ptr, marks_ptr, first_ptr, last_ptr, bad_ptr, CAP, C,
                            TEXT_TILES, BLOCK_TILES, TEXT_ROWS, FIXED_ROWS, MARK: tl.constexpr, BLOCK: tl.constexpr):
        """Where the inverse kernel finds each tile's escapes: the tile's first listed escape
        and one past its last (the list is in order of position, so a tile's 64 rows hold
        a run of it). Checks that the escapes and the decoder's marks are the same places:
        each listed position holds a mark, and there are as many marks as escapes; else
        `bad`. gpu.py has checked that the positions lie inside the tensor, in order."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        n_esc = tl.load(n_esc_ptr)
        listed = k < tl.minimum(n_esc, CAP)
        pos = tl.load(pos_ptr + k, mask=listed, other=0)
        row = pos // C
        tile = tl.where(row < TEXT_ROWS, row // 64,
                        tl.where(row < FIXED_ROWS, TEXT_TILES + (row - TEXT_ROWS) // 64,
                                 TEXT_TILES + BLOCK_TILES + (row - FIXED_ROWS) // 64))
        tl.atomic_min(first_ptr + tile, k, mask=listed)
        tl.atomic_max(last_ptr + tile, k + 1, mask=listed)
        unmarked = listed & (tl.load(value_ptr + pos, mask=listed, other=MARK) != MARK)
        miscounted = (k == 0) & (tl.load(marks_ptr).to(tl.int64) != n_esc)
        wrong = (unmarked | miscounted).to(tl.int32)
        tl.atomic_or(bad_ptr + k * 0, wrong, mask=wrong != 0)

    @any_size
    def _inverse_kernel(value_ptr, steps_ptr, first_ptr, last_ptr, esc_pos_ptr, esc_val_ptr, ref_ptr, pred_ptr,
                        new_ref_ptr, center_ptr, loud_mask_ptr, loud_idx_ptr, n_loud, d2_ptr, out_ptr, table_ptr,
                        N_PROGRAMS,
                        GROUPS, T, N_TXT, H, W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS, FIXED_ROWS,
                        C: tl.constexpr, CB: tl.constexpr, CHUNKS: tl.constexpr, HAS_REF: tl.constexpr,
                        WRITE_REF: tl.constexpr, TEXT: tl.constexpr, LOUD: tl.constexpr, PREC: tl.constexpr,
                        THROUGH: tl.constexpr, OUT_DT: tl.constexpr):
        """The decoder's int16 values (entropy_triton.decode) times their channel's step,
        the escapes' values in their places (each tile's run of the list, from
        _escape_rows_kernel), the reference added, the inverse DCT, the centre: the output.
        THROUGH: the reference, the new reference and the output come from the address
        table (their pointer arguments are not read)."""
        if THROUGH:
            ref_ptr = _through(table_ptr, SLOT_REF, tl.bfloat16)
            new_ref_ptr = _through(table_ptr, SLOT_NEW_REF, tl.bfloat16)
            out_ptr = _through(table_ptr, SLOT_OUT, OUT_DT)
        d2t = tl.load(d2_ptr + tl.arange(0, 64)[None, :] * 64 + tl.arange(0, 64)[:, None])  # the DCT's transpose
        # persistent: each program loads the inverse DCT once and takes tiles until none
        # are left (H100: 0.117 -> 0.102 ms; the quantiser, made persistent alike, went
        # 0.204 -> 0.30 ms, so it is not)
        for p in range(tl.program_id(0), N_PROGRAMS, tl.num_programs(0)):
            tile = p // GROUPS
            escapes = tl.load(first_ptr + tile), tl.load(last_ptr + tile)  # (loaded early: used below)
            sym, ok, cls, xrow, own, img = _rows(tile, T, N_TXT, H, W, HB, WB, TEXT_TILES, BLOCK_TILES, TEXT_ROWS,
                                                 FIXED_ROWS, n_loud, loud_idx_ptr, TEXT, LOUD)
            block = (tile >= TEXT_TILES) & (tile < TEXT_TILES + BLOCK_TILES)
            if block:
                own = tl.where(tl.load(loud_mask_ptr + img) != 0, -1, own)  # the loud row writes that token
            for j in range(CHUNKS):
                ch = ((p % GROUPS) * CHUNKS + j) * CB + tl.arange(0, CB)
                cm = ch < C
                m = ok[:, None] & cm[None, :]
                at = sym.to(tl.int64)[:, None] * C + ch[None, :]
                c = tl.load(value_ptr + at, mask=m, other=0).to(tl.float32)
                c *= tl.load(steps_ptr + ch, mask=cm, other=0.0)[None, :]
                # one at a time, scalars: a search over the tile's elements (or any branch
                # that holds them) took 25 more registers and a block of 4 warps less a
                # multiprocessor; the inverse went 0.150 -> 0.185 ms (H100)
                for e in range(escapes[0], escapes[1]):
                    c = tl.where(at == tl.load(esc_pos_ptr + e), tl.load(esc_val_ptr + e), c)
                if HAS_REF:  # (the weight's product with the reference is exact: bf16 values)
                    c += tl.load(ref_ptr + at, mask=m, other=0.0).to(tl.float32) * tl.load(pred_ptr)
                if WRITE_REF:
                    tl.store(new_ref_ptr + at, _to_ref(c), mask=m)  # (the output takes c unrounded)
                if block:
                    c = tl.dot(d2t, c, input_precision=PREC)
                c += tl.load(center_ptr + ch, mask=cm, other=0.0)[None, :]
                tl.store(out_ptr + own.to(tl.int64)[:, None] * C + ch[None, :], c,
                         mask=(own >= 0)[:, None] & cm[None, :])

    @triton.jit
    def _select_digit(hist, rank, pre, shift: tl.constexpr):
        """One radix-select step: the 4-bit digit at `shift` of the value of ascending rank
        `rank` among those the 16 first bins of `hist` counted -> (pre with it, the rank
        left within the digit's bin, how many the digit's bin holds)."""
        j = tl.arange(0, 32)
        below = tl.cumsum(tl.where(j < 16, hist, 0), 0)  # values in bins <= j
        digit = tl.sum(((below <= rank) & (j < 16)).to(tl.int32), 0)
        rank -= tl.sum(tl.where(j < digit, hist, 0), 0)
        return pre | (digit << shift), rank, tl.sum(tl.where(j == digit, hist, 0), 0)

    @triton.jit
    def _norm_bits(sq_ptr, i, n, HW, T, N_TXT):
        """Image tokens i's squared norms (i < n; after each batch item's N_TXT text tokens
        of T) and their bits as int32, which order like the norms (non-negative floats);
        a negative NaN's with the largest."""
        v = tl.load(sq_ptr + (i // HW) * T + N_TXT + i % HW, mask=i < n, other=0.0)
        bits = v.to(tl.int32, bitcast=True)
        return v, tl.where(bits < 0, 0x7FFFFFFF, bits)

    @any_size
    def _loud_kernel(sq_ptr, n, CAP, HW, T, N_TXT, factor_sq, idx_ptr, count_ptr, mask_ptr, n_sym_ptr, FIXED_ROWS, C,
                     BLOCK: tl.constexpr):
        """gpu_layout.find_loud in one program: the image tokens' (n of them, HW a batch
        item, after N_TXT text tokens of T) centred squared norms; -> the loud ones'
        indices, ascending, then -1 up to CAP, and their count; each image token's mask
        byte (1: loud) and the count of symbols to code, (FIXED_ROWS + count) * C (int32),
        in place of five small kernels after it. The lower median and the CAP-th largest norm
        by radix select on the float bits (non-negative floats order like their bits), 4
        bits a pass; of equal norms at the cut, the first."""
        r_med = (n - 1) // 2
        r_cut = n - tl.minimum(CAP, n)  # ascending rank of the smallest of the CAP largest
        pre_med = r_med * 0
        pre_cut = r_med * 0
        at_cut = r_med * 0
        for d in tl.static_range(7, -1, -1):
            hist_med = tl.zeros((32,), tl.int32)
            hist_cut = tl.zeros((32,), tl.int32)
            for start in range(0, n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                ok = i < n
                norms, bits = _norm_bits(sq_ptr, i, n, HW, T, N_TXT)  # (the norms: not needed here)
                digit = (bits >> (4 * d)) & 15
                if d < 7:
                    in_med = ok & ((bits >> (4 * d + 4)) == (pre_med >> (4 * d + 4)))
                    in_cut = ok & ((bits >> (4 * d + 4)) == (pre_cut >> (4 * d + 4)))
                else:
                    in_med = ok
                    in_cut = ok
                hist_med += tl.histogram(tl.where(in_med, digit, digit + 16), 32)
                hist_cut += tl.histogram(tl.where(in_cut, digit, digit + 16), 32)
            pre_med, r_med, _ = _select_digit(hist_med, r_med, pre_med, 4 * d)
            pre_cut, r_cut, at_cut = _select_digit(hist_cut, r_cut, pre_cut, 4 * d)
        limit = pre_med.to(tl.float32, bitcast=True) * factor_sq
        # the last pass's bin holds the norms equal to the cut, r_cut of them below it in
        # the ascending order: the rest of them are taken, the first in token order
        take_ties = at_cut - r_cut
        ties = r_cut * 0  # equal to the cut, seen so far
        found = r_cut * 0
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < n
            v, bits = _norm_bits(sq_ptr, i, n, HW, T, N_TXT)
            tie = ok & (bits == pre_cut)
            tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0) - 1
            ties += tl.sum(tie.to(tl.int32), 0)
            chosen = ok & (v > limit) & ((bits > pre_cut) | (tie & (tie_rank < take_ties)))
            at = found + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(idx_ptr + at, i.to(tl.int64), mask=chosen)
            tl.store(mask_ptr + i, chosen.to(tl.uint8), mask=ok)
            found += tl.sum(chosen.to(tl.int32), 0)
        for start in range(0, CAP, BLOCK):
            j = start + tl.arange(0, BLOCK)
            tl.store(idx_ptr + j, tl.full((BLOCK,), -1, tl.int64), mask=(j >= found) & (j < CAP))
        tl.store(count_ptr, found.to(tl.int64))
        tl.store(n_sym_ptr, (FIXED_ROWS + found) * C)

    @any_size
    def _loud_mask_kernel(idx_ptr, n_loud_ptr, n, mask_ptr, n_sym_ptr, FIXED_ROWS, C, BLOCK: tl.constexpr,
                          LOUD_BLOCK: tl.constexpr):
        """A delta message's loud-token mask over the n image tokens (BLOCK of them a
        program), from the stream's loud tokens (the first n_loud indices), and the
        count of symbols to code, as _loud_kernel gives them for a key."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        n_loud = tl.load(n_loud_ptr).to(tl.int32)
        hit = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, n_loud, LOUD_BLOCK):
            k = start + tl.arange(0, LOUD_BLOCK)
            idx = tl.load(idx_ptr + k, mask=k < n_loud, other=-1)
            hit += tl.sum((idx[None, :] == i[:, None]).to(tl.int32), 1)
        tl.store(mask_ptr + i, (hit > 0).to(tl.uint8), mask=i < n)
        if tl.program_id(0) == 0:
            tl.store(n_sym_ptr, (FIXED_ROWS + n_loud) * C)

    @any_size
    def _centre_spread_kernel(x_ptr, centre_ptr, spread_ptr, message_centre_ptr, n, C, table_ptr, R: tl.constexpr,
                              CB: tl.constexpr, HAS_CENTRE: tl.constexpr, TO_MESSAGE: tl.constexpr,
                              THROUGH: tl.constexpr, X_DT: tl.constexpr):
        """gpu_layout's sample_rows, channel_centre (unless HAS_CENTRE: given; with
        TO_MESSAGE also as bf16 at message_centre_ptr, the message's part) and
        channel_spread for CB channels: R evenly spaced rows of the (n, C) carry, one
        bitonic sort for both medians. THROUGH: the carry comes from the address table."""
        if THROUGH:
            x_ptr = _through(table_ptr, SLOT_X, X_DT)
        ch = tl.program_id(0) * CB + tl.arange(0, CB)
        cm = ch < C
        r = tl.arange(0, R)
        row = r.to(tl.int64) * (n - 1) // (R - 1)
        v = tl.load(x_ptr + row[None, :] * C + ch[:, None], mask=cm[:, None], other=0.0).to(tl.float32)
        M: tl.constexpr = (R - 1) // 2  # the lower median's rank
        if HAS_CENTRE:  # (a delta's: one sort, of the distances)
            centre = tl.load(centre_ptr + ch, mask=cm, other=0.0)
            distances = tl.sort(tl.abs(v - centre[:, None]), dim=1)
            mad = 1.4826 * tl.sum(tl.where(r[None, :] == M, distances, 0.0), 1)
        else:
            ranked = tl.sort(v, dim=1)
            # (to bf16 as torch rounds: Triton's interpreter would truncate)
            centre = _to_ref(tl.sum(tl.where(r[None, :] == M, ranked, 0.0), 1)).to(tl.float32)
            tl.store(centre_ptr + ch, centre, mask=cm)
            if TO_MESSAGE:
                tl.store(message_centre_ptr + ch, centre.to(tl.bfloat16), mask=cm)  # (exact: a bf16 value)
            # The lower median of |v - centre| without a second sort (H200: 0.066 -> 0.043
            # ms for 6144 channels): the M + 1 values nearest the centre are a run of the
            # sorted ones (the distance falls towards the centre and rises after it,
            # rounding included), so it is the least, over the runs [a, a + M], of the
            # distance of the run's farther end. (Where the centre is given, this was
            # slower than sorting the distances: 0.030 -> 0.050 ms.)
            far = tl.gather(ranked, tl.minimum(r + M, R - 1)[None, :] + tl.zeros((CB, R), tl.int32), 1)
            ends = tl.maximum(tl.abs(ranked - centre[:, None]), tl.abs(far - centre[:, None]))
            mad = 1.4826 * tl.min(tl.where(r[None, :] + M < R, ends, float("inf")), 1)
        d = v - centre[:, None]
        rms = tl.sqrt(tl.sum(d * d, 1) / R)
        tl.store(spread_ptr + ch, tl.where(mad > 0, mad, rms), mask=cm)

    @triton.jit
    def _token_sq_kernel(x_ptr, center_ptr, centred_ptr, plain_ptr, table_ptr, C: tl.constexpr, CB: tl.constexpr,
                         THROUGH: tl.constexpr, X_DT: tl.constexpr):
        if THROUGH:
            x_ptr = _through(table_ptr, SLOT_X, X_DT)
        row = tl.program_id(0).to(tl.int64)
        acc_c = tl.zeros((CB,), tl.float32)
        acc_p = tl.zeros((CB,), tl.float32)
        for c0 in range(0, C, CB):
            ch = c0 + tl.arange(0, CB)
            cm = ch < C
            v = tl.load(x_ptr + row * C + ch, mask=cm, other=0.0).to(tl.float32)
            d = tl.where(cm, v - tl.load(center_ptr + ch, mask=cm, other=0.0), 0.0)
            acc_c += d * d
            acc_p += v * v
        tl.store(centred_ptr + row, tl.sum(acc_c, 0))
        tl.store(plain_ptr + row, tl.sum(acc_p, 0))


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} \
    if triton is not None else {}


def _tiles(p: Layout) -> tuple[int, int, int]:
    """A layout's tiles of 64 coefficient rows: text, 8x8 blocks, loud tokens."""
    return -(-p.text_rows // 64), p.block_rows // ROWS_PER_BLOCK, -(-p.loud_capacity // 64)


class _Grid:
    """Kernel arguments that describe a layout's tiles."""

    def __init__(self, layout: Layout, device):
        p = layout
        self.layout = p
        self.text_tiles, self.block_tiles, self.loud_tiles = _tiles(p)
        self.tiles = self.text_tiles + self.block_tiles + self.loud_tiles
        self.groups = -(-p.channels // (CHANNEL_BLOCK * CHUNKS))  # channel groups per tile
        self.programs = self.tiles * self.groups
        # the persistent kernel's programs: PROGRAMS_PER_SM a multiprocessor (a tile each on a CPU)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        self.persistent = min(self.programs, sms * PROGRAMS_PER_SM) if sms and PROGRAMS_PER_SM else self.programs
        self.d2 = device_constant("dct2", device, dct2_matrix)  # the 64x64 block DCT
        self.dct_pieces = (device_constant("dct2_bf16_pieces", device, dct2_bf16_pieces),
                           device_constant("dct2_piece_sums", device, dct2_piece_sums))

    def args(self) -> dict:
        p = self.layout
        return dict(GROUPS=self.groups, T=p.tokens, N_TXT=p.n_txt, H=max(p.h, 1), W=max(p.w, 1), HB=max(p.hb, 1),
                    WB=max(p.wb, 1), TEXT_TILES=self.text_tiles, BLOCK_TILES=self.block_tiles,
                    TEXT_ROWS=p.text_rows, FIXED_ROWS=p.fixed_rows, C=p.channels, CB=CHANNEL_BLOCK, CHUNKS=CHUNKS,
                    TEXT=TEXT_CLASS, LOUD=LOUD_CLASS, PREC=PRECISION, num_warps=NUM_WARPS)


def _centre_and_spread(x: torch.Tensor, centre: torch.Tensor | None, through: dict | None = None,
                       message_centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gpu_layout.channel_centre (unless given) and channel_spread over sample_rows(x),
    in one kernel: on an H100 the two median kernels and the torch ops between them
    (sampling, centring, |.|, the RMS fallback) took 0.2 ms of a 1.3 ms encode.
    `through`: the address table's kernel arguments (_through_args; None: x's own).
    `message_centre`: where a centre found here also goes, as bf16 (the message's part)."""
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    if n < STATS_ROWS:  # few tokens: no power-of-two row count (never through a table: reads x here)
        rows = sample_rows(x)
        if centre is None:
            centre = channel_centre(rows)
            if message_centre is not None:
                message_centre.copy_(centre)
        return centre, channel_spread(rows - centre)
    through = through or _through_args(x, None)
    spread = torch.empty(c, dtype=torch.float32, device=x.device)
    out = torch.empty_like(spread) if centre is None else centre
    _centre_spread_kernel[(-(-c // MEDIAN_CHANNELS),)](x, out, spread, message_centre if message_centre is not None
                                                       else spread, n, c, R=STATS_ROWS, CB=MEDIAN_CHANNELS,
                                                       HAS_CENTRE=centre is not None,
                                                       TO_MESSAGE=message_centre is not None, num_warps=MEDIAN_WARPS,
                                                       **through)
    return out, spread


def takes_table(x: torch.Tensor) -> bool:
    """Whether an encode of `x` can read it through an address table: every kernel, not
    torch ops, reads the carry (not so below STATS_ROWS tokens)."""
    return x.numel() // x.shape[-1] >= STATS_ROWS


def _through_args(x: torch.Tensor, table: torch.Tensor | None) -> dict:
    """The kernels' arguments for reading through `table` (None: the pointers given)."""
    return {"table_ptr": table if table is not None else x, "THROUGH": table is not None,
            "X_DT": _TRITON_DTYPES[x.dtype]}


#: set to a dict to collect host times (perf_counter) of the encoder's phases: "start",
#: "queued" (every kernel launched), "sizes" (the small copy back); bench/gpu_codec_check.py
PHASES: dict | None = None


def mark(name: str) -> None:
    if PHASES is not None:
        PHASES[name] = time.perf_counter()


class Loud(NamedTuple):
    """The loud tokens as the encoder's kernels take them: `loud_capacity` flat
    image-token indices (int64, -1 after the last), their count (int64, 0-d), each image
    token's mask byte (1: loud) and the count of symbols to code, (fixed rows + count)
    times the channels (int32, (1,))."""

    idx: torch.Tensor
    count: torch.Tensor
    mask: torch.Tensor
    n_sym: torch.Tensor


def find_loud_fused(token_sq: torch.Tensor, p: Layout) -> Loud:
    """gpu_layout.find_loud in one kernel, from every token's centred squared norm (B * T
    of them: the kernel skips the text tokens). torch's median, topk and sort took 0.062
    ms on an H100 for a 64 x 64 grid, most of it in one-block sorts; this, 0.035 ms."""
    device = token_sq.device
    idx = torch.empty(p.loud_capacity, dtype=torch.int64, device=device)
    count = torch.empty((), dtype=torch.int64, device=device)
    mask = torch.empty(p.image_tokens, dtype=torch.uint8, device=device)
    n_sym = torch.empty(1, dtype=torch.int32, device=device)
    _loud_kernel[(1,)](token_sq, p.image_tokens, p.loud_capacity, p.h * p.w, p.tokens, p.n_txt, LOUD_FACTOR ** 2,
                       idx, count, mask, n_sym, p.fixed_rows, p.channels, BLOCK=LOUD_BLOCK, num_warps=LOUD_WARPS)
    return Loud(idx, count, mask, n_sym)


def given_loud(idx: torch.Tensor, count: torch.Tensor, p: Layout) -> Loud:
    """A delta message's Loud from its stream's loud tokens (`idx`: at least `count` of
    them, -1 after), in one kernel."""
    mask = torch.empty(max(p.image_tokens, 1), dtype=torch.uint8, device=idx.device)
    n_sym = torch.empty(1, dtype=torch.int32, device=idx.device)
    block = 1024
    _loud_mask_kernel[(max(1, -(-p.image_tokens // block)),)](idx, count, p.image_tokens, mask, n_sym,
                                                              p.fixed_rows, p.channels, BLOCK=block, LOUD_BLOCK=16)
    return Loud(idx, count, mask, n_sym)


def no_loud(p: Layout, device) -> Loud:
    """Loud for a carry without an image grid: none."""
    return Loud(torch.full((1,), -1, dtype=torch.int64, device=device),
                torch.zeros((), dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.uint8, device=device),
                torch.full((1,), p.fixed_rows * p.channels, dtype=torch.int32, device=device))


def _sample_stride(programs: int, share: int) -> int:
    """A stride that visits about 1/`share` of `programs` (tile, channel group)s (all of
    them when there are few), each once and every channel group among them: coprime with
    the program count."""
    stride = max(1, min(share, programs // 256))
    while stride > 1 and math.gcd(stride, programs) != 1:
        stride -= 1
    return stride


class _StepFit:
    """The step fit's two passes on the device: candidates, their error over a sample of
    the (tile, channel group) programs, the best, the next candidates (_candidates_kernel
    in place of the ~50 small torch ops it took)."""

    def __init__(self, grid: _Grid, spread: torch.Tensor, tot_sq: torch.Tensor, settings, numel: int):
        self.grid, self.spread, self.tot_sq = grid, spread, tot_sq
        self.rel_err, self.floor = settings.rel_err, settings.channel_rel_err * math.sqrt(12.0)
        self.twelve_over_n = 12.0 / max(numel, 1)
        self.ratios = device_constant("fit_ratios", spread.device, _fit_ratios)

    def candidates(self, mode: int, previous: tuple | None, steps_out: torch.Tensor | None = None) -> tuple:
        """-> (candidate steps (K,), per-channel steps (K, C), reciprocals (K, C)); mode 2:
        row 0 only, the chosen step, and its channel steps also go to `steps_out` (bf16, (C,))."""
        c, device = self.spread.numel(), self.spread.device
        rows = CANDIDATES if mode < 2 else 1
        cand = torch.empty(rows, dtype=torch.float32, device=device)
        steps = torch.empty(rows, c, dtype=torch.float32, device=device)
        inv = torch.empty_like(steps)
        (err, n_err), scale, prev = previous if previous is not None else ((self.tot_sq, 0), 1.0, cand)
        _candidates_kernel[(-(-c // GLUE_CHANNELS),)](
            err, n_err, scale, self.rel_err, self.tot_sq, self.twelve_over_n, prev, self.ratios[min(mode, 1)],
            self.spread, self.floor, cand, steps, inv, steps_out if steps_out is not None else cand, c, K=CANDIDATES,
            CB=GLUE_CHANNELS, MODE=mode, FINEST=FINEST_STEP)
        return cand, steps, inv

    def errors(self, common: dict, x, ref, candidates: tuple, share: int, cells: tuple | None, through: dict) -> tuple:
        """Each candidate's squared error over the sampled programs -> ((their (programs, K)
        partial sums, how many programs), the factor to the whole carry, the candidates):
        the next candidates kernel sums them. With `cells`, each (class, channel)'s sum of
        squares and row count over the sample are added to them."""
        part, n_prog = self._sampled(common, x, ref, share, through, candidates[1:], cells, weight=False)
        return (part, n_prog), self.grid.programs / n_prog, candidates[0]

    def weight(self, common: dict, x, ref, through: dict) -> torch.Tensor:
        """A delta's weight on the reference (gpu_layout.prediction_weight), fitted on the
        coarse pass's sample -> (1,) float32 on the device."""
        part, n_prog = self._sampled(common, x, ref, COARSE_SHARE, through, None, None, weight=True)
        weight = torch.empty(1, dtype=torch.float32, device=x.device)
        _weight_kernel[(1,)](part, n_prog, weight, PRED_MAX=PRED_MAX, K=CANDIDATES)
        return weight

    def _sampled(self, common: dict, x, ref, share: int, through: dict, steps: tuple | None, cells: tuple | None,
                 weight: bool) -> tuple[torch.Tensor, int]:
        """_fit_kernel over about 1/`share` of the programs -> (its (programs, K) partial
        sums, how many programs)."""
        grid = self.grid
        stride = _sample_stride(grid.programs, share)
        n_prog = -(-grid.programs // stride)
        part = torch.empty(n_prog, CANDIDATES, dtype=torch.float32, device=x.device)
        sq, count = cells if cells is not None else (part, part)
        steps, inv = steps if steps is not None else (part, part)  # (not read when fitting the weight)
        _fit_kernel[(n_prog,)](x, *common["pointers"], ref if ref is not None else x, common["pred"], steps, inv,
                               part, sq, count, stride, grid.programs, K=CANDIDATES, HAS_REF=ref is not None,
                               SQ=cells is not None, PRED=weight, NCLS=N_CLASSES,
                               SPLIT=FIT_SPLIT if common["split"] else 0,
                               **through, **(grid.args() | {"PREC": FIT_PRECISION}))
        return part, n_prog


def _fit_ratios(device) -> torch.Tensor:
    """(2, K) the two passes' candidate spacings around their base step."""
    k = torch.arange(CANDIDATES, dtype=torch.float32) - 4
    return torch.stack([COARSE_RATIO ** k, FINE_RATIO ** k]).to(device)


class Inputs:
    """What a delta message starts from (the stream's reference), or None's for a key."""

    def __init__(self, center=None, loud_idx=None, n_loud=None, ref=None):
        self.center, self.loud_idx, self.n_loud, self.ref = center, loud_idx, n_loud, ref

    @classmethod
    def of(cls, x: torch.Tensor, p: Layout, reference: dict | None) -> "Inputs":
        if reference is None:
            return cls()
        loud_idx = reference.get("loud_idx")
        if loud_idx is None:  # a reference the torch path made (after too many escapes)
            loud_idx = torch.tensor(list(p.loud) or [-1], dtype=torch.int64, device=x.device)
        return cls(reference["center"], loud_idx, torch.full((), len(p.loud), dtype=torch.int64, device=x.device),
                   reference["coef"])


def launch_encode(x: torch.Tensor, p: Layout, settings, inputs: Inputs, keep: bool,
                  table: torch.Tensor | None = None) -> dict:
    """Every kernel of one encode, no host round trip: -> the device tensors a message
    is made of, and `meta` (sizes and flags, int64: _meta_kernel) for the one small copy
    back. With `table` (a captured graph's gpu_graphs.AddressTable, on the device; only
    where takes_table(x)): the kernels read the carry and the reference, and write the
    new reference, where it points when they run; `x` and `inputs.ref` then only give the
    shape, dtype and whether there is a reference, and "new_ref" is None. Every small
    step between the big kernels is a kernel of ours or a view: in a captured graph each
    torch op is a node of a few microseconds."""
    device = x.device
    delta = inputs.ref is not None
    through = _through_args(x, table)
    layout = _Payload(p, _geometry(p, settings, delta))
    payload = torch.empty(layout.capacity, dtype=torch.uint8, device=device)
    # 1. statistics (a key's centre also into the message; a delta's comes with its stream)
    center, spread = _centre_and_spread(x, inputs.center, through, None if delta else layout.view(payload, "center"))
    centred_sq = torch.empty(p.batch * p.tokens, dtype=torch.float32, device=device)
    plain_sq = torch.empty_like(centred_sq)
    _token_sq_kernel[(p.batch * p.tokens,)](x, center, centred_sq, plain_sq, C=p.channels, CB=1024, **through)
    if not p.h:
        loud = no_loud(p, device)
    elif delta:
        loud = given_loud(inputs.loud_idx, inputs.n_loud, p)
    else:
        loud = find_loud_fused(centred_sq, p)
    grid = _Grid(p, device)
    common = {"pointers": (center, loud.mask, loud.idx, loud.count, grid.d2, *grid.dct_pieces),
              "split": x.dtype == torch.bfloat16}
    tot_sq = plain_sq.sum(dtype=torch.float64)
    numel = p.batch * p.tokens * p.channels
    ref = inputs.ref
    # the buffers the kernels count into, zeroed at once: HIST_COPIES histograms, the
    # context tables in use, the escapes, (2, N_CLASSES, C) float32 cells; each on 16
    # bytes (the kernels' variants must not depend on the channel count)
    sizes = [HIST_COPIES * HIST_BINS, N_BUCKETS, 4, 2 * N_CLASSES * p.channels]
    hist, used, esc_count, cells = torch.zeros(sum(sizes), dtype=torch.int32, device=device).split(sizes)
    hist, esc_count = hist.view(HIST_COPIES, HIST_BINS), esc_count[:1]
    cells = cells.view(torch.float32).view(2, N_CLASSES, p.channels)

    # 2. step fit: coarse on a sample, fine on a larger one; before it, a delta's weight
    # on the reference (a key reads none, nor does the weight's own pass: any float32
    # pointer serves there)
    fit = _StepFit(grid, spread, tot_sq, settings, numel)
    common["pred"] = spread
    if delta:
        common["pred"] = fit.weight(common, x, ref, through)
    coarse = fit.errors(common, x, ref, fit.candidates(0, None), COARSE_SHARE, None, through)
    fine = fit.errors(common, x, ref, fit.candidates(1, coarse), FINE_SHARE, (cells[0], cells[1]), through)
    step, steps_c, inv_c = fit.candidates(2, fine, steps_out=layout.view(payload, "steps"))
    steps_c, inv_c = steps_c[0], inv_c[0]

    # 3. contexts and quantisation
    buckets = layout.view(payload, "buckets")
    _buckets_kernel[(-(-p.channels // GLUE_CHANNELS),)](cells[0], cells[1], steps_c, buckets, used, p.channels,
                                                       NCLS=N_CLASSES, CLS_BLOCK=triton.next_power_of_2(N_CLASSES),
                                                       CB=GLUE_CHANNELS, OFFSET=BUCKET_OFFSET, NB=N_BUCKETS)
    max_rows = p.fixed_rows + p.loud_capacity
    symbols = torch.empty(max_rows * p.channels, dtype=torch.int32, device=device)
    esc_pos = torch.empty(ESCAPE_CAPACITY, dtype=torch.int64, device=device)
    esc_val = torch.empty(ESCAPE_CAPACITY, dtype=torch.float32, device=device)
    # the new reference goes to a new buffer: the old one stays whole if this path gives up
    new_ref = torch.empty(max_rows * p.channels, dtype=REF_DTYPE, device=device) \
        if keep and table is None else None
    share = HIST_SHARE or (64 if max_rows * p.channels >= 64 * HIST_SAMPLE else 16)
    if not (1 <= share <= 64 and share & (share - 1) == 0):
        raise ValueError(f"HIST_SHARE must be a power of two from 1 to 64, got {share}")
    kept = 64 // share  # rows of each tile in the histogram sample
    keys = torch.empty(grid.programs * CHUNKS * kept * CHANNEL_BLOCK, dtype=torch.int32, device=device)
    _quantise_kernel[(grid.programs,)](x, *common["pointers"], ref if ref is not None else x, common["pred"],
                                       new_ref if new_ref is not None else x, steps_c, inv_c, buckets,
                                       symbols, keys, esc_count, esc_pos, esc_val, ESCAPE_CAPACITY,
                                       share.bit_length() - 1,
                                       HAS_REF=delta, WRITE_REF=keep, EXACT=EXACT_TOKENS,
                                       MAXE=MAX_EXP, ESC=ESCAPE, SPLIT=SPLIT if common["split"] else 0, **through,
                                       **grid.args(), **({"maxnreg": QUANTISE_MAXNREG} if QUANTISE_MAXNREG else {}))
    _histogram_kernel[(-(-keys.numel() // HIST_BLOCK),)](keys, keys.numel(), hist, HIST_COPIES, BINS=HIST_BINS,
                                                         BLOCK=HIST_BLOCK)
    tables = (torch.empty(HIST_BINS, dtype=torch.int32, device=device),
              torch.empty(HIST_BINS, dtype=torch.float64, device=device))
    _tables_kernel[(N_BUCKETS,)](hist, HIST_COPIES, used, share, layout.view(payload, "freq"), *tables, ALPHA=ALPHABET,
                                 SCALE=PROB_SCALE, BINS=HIST_BINS, num_warps=1)

    # 4. rANS, sized for the most loud rows; the words back to back after the parts the
    # kernels above wrote in place
    counts = layout.view(payload, "group_words")
    buf = entropy_triton.encode(symbols, loud.n_sym, tables, layout.geo, counts, layout.view(payload, "states"))
    entropy_triton.gather_words(buf, counts, layout.view(payload, "words"))
    sorted_pos, sorted_val = torch.empty_like(esc_pos), torch.empty_like(esc_val)
    _sort_escapes_kernel[(1,)](esc_count, esc_pos, esc_val, sorted_pos, sorted_val, CAP=ESCAPE_CAPACITY, num_warps=8)
    meta = torch.empty(6 + loud.idx.numel(), dtype=torch.int64, device=device)
    _meta_kernel[(1,)](counts, counts.numel(), esc_count, loud.count, step, tot_sq, common["pred"], loud.idx,
                       loud.idx.numel(), meta, BLOCK=1024)
    return {"meta": meta, "payload": payload, "layout": layout, "center": center, "esc_pos": sorted_pos,
            "esc_val": sorted_val, "new_ref": new_ref, "loud_idx": loud.idx}


class _Payload:
    """Where each part of a fused message sits in its device buffer: the fixed-size
    parts at ALIGN-ed offsets (typed views need them), the words last, so the bytes to
    copy back are one prefix. All 32 context tables travel (2.5 KB), and every group,
    also those the loud rows left empty (they decode to nothing)."""

    def __init__(self, p: Layout, geo: Geometry):
        self.geo = geo
        sizes = {"center": (p.channels, torch.bfloat16), "steps": (p.channels, torch.bfloat16),
                 "buckets": (N_CLASSES * p.channels, torch.uint8), "freq": (N_BUCKETS * ALPHABET, torch.int16),
                 "group_words": (geo.groups, torch.int32), "states": (geo.groups * geo.lanes, torch.int32),
                 "words": (2 * geo.padded, torch.int16)}  # at most two words a symbol
        self.parts, at = {}, 0
        for name, (count, dtype) in sizes.items():
            nbytes = count * dtype.itemsize
            self.parts[name] = (at, nbytes, dtype)
            at += aligned(nbytes)
        self.capacity = at

    def view(self, payload: torch.Tensor, name: str) -> torch.Tensor:
        at, nbytes, dtype = self.parts[name]
        return payload[at:at + nbytes].view(dtype)

    def used_bytes(self, total_words: int) -> int:
        return self.parts["words"][0] + 2 * total_words


def _geometry(p: Layout, settings, delta: bool) -> Geometry:
    """rANS geometry for the most loud rows; as many groups (warps) as min_steps allows:
    the kernels are latency-bound."""
    return Geometry.for_count((p.fixed_rows + p.loud_capacity) * p.channels, settings.lanes, settings.steps_for(delta),
                              settings.max_steps, target_groups=1 << 30)


def finish_encode(dev: dict, meta: torch.Tensor, p: Layout, delta: bool, keep: bool, captured: bool) -> dict | None:
    """From the kernels' outputs and the sizes read back: the message bytes on the host
    (one copy of the payload's used prefix), and what gpu.py puts in the header, as
    gpu_reference.encode returns it (None: more escapes than the kernels collect). From a
    captured graph, the reference is copied out: the next replay overwrites it."""
    total_words, n_esc, n_loud = int(meta[0]), int(meta[1]), int(meta[2])
    if not math.isfinite(float(meta[4:5].view(torch.float64))):
        raise _non_finite()
    if n_esc > ESCAPE_CAPACITY:
        return None
    loud = tuple(int(i) for i in meta[6:6 + n_loud])
    full = Layout(p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, loud)
    layout = dev["layout"]
    used = layout.used_bytes(total_words)
    esc_at = aligned(used)  # the escapes after the payload, aligned for their typed views
    on_gpu = dev["payload"].is_cuda
    host = torch.empty(esc_at + 12 * n_esc, dtype=torch.uint8, pin_memory=on_gpu)
    host[:used].copy_(dev["payload"][:used], non_blocking=True)
    if n_esc:
        host[esc_at:esc_at + 8 * n_esc].view(torch.int64).copy_(dev["esc_pos"][:n_esc], non_blocking=True)
        host[esc_at + 8 * n_esc:].view(torch.float32).copy_(dev["esc_val"][:n_esc], non_blocking=True)
    if keep:
        own = (lambda t: t.clone()) if captured else (lambda t: t)
        coef = dev["new_ref"][:full.n_coef]  # a graph's own buffer, unless it wrote through its table
        reference = {"coef": coef if dev.get("fresh_ref") else own(coef), "center": own(dev["center"]),
                     "loud_idx": own(dev["loud_idx"])}
    if on_gpu:
        torch.cuda.current_stream(dev["payload"].device).synchronize()
    view = memoryview(host.numpy())
    buffers = {}
    for name, (at, nbytes, _) in layout.parts.items():
        buffers[name] = view[at:at + (2 * total_words if name == "words" else nbytes)]
    buffers["esc_pos"], buffers["esc_val"] = view[esc_at:esc_at + 8 * n_esc], view[esc_at + 8 * n_esc:]
    out = {"layout": full, "step": float(meta[3:4].to(torch.int32).view(torch.float32)), "geo": layout.geo,
           "tables": list(range(N_BUCKETS)), "norm": math.sqrt(float(meta[4:5].view(torch.float64))),
           "buffers": buffers, "n_esc": n_esc}
    if delta:
        del buffers["center"]
        out["pred"] = float(meta[5:6].to(torch.int32).view(torch.float32))
    if keep:
        out["reference"] = reference
    return out


def _non_finite():
    from .base import CodecError
    return CodecError("cannot encode NaN or Inf values; send this tensor with the raw codec")


def decoder_inputs(p: Layout, parts: dict, tables: list[int], n_esc: int, words: int,
                   pred: float) -> dict:
    """The fused decoder's small inputs, on the host, from the header and the message's
    small parts (`parts`: name -> bytes; gpu.py has checked them), to go up with the
    message in its one upload: made on the device they were about 30 small ops a decode
    (0.06 ms of kernels on an H100, each a node of a captured graph). Each channel's
    step, the full context tables, where each rANS group's words start, each row's
    context row, the loud tokens' mask, the key's centre in float32, a delta's weight on
    the reference (`pred`: 1 for a key, not read), and the buffers the
    kernels count into, zeroed (`flags`: corrupt, escapes marked; the escape runs' first
    and last)."""
    freq = np.zeros((N_BUCKETS, ALPHABET), dtype=np.int32)
    if tables:
        freq[tables] = np.frombuffer(parts["freq"], dtype=np.int16).reshape(len(tables), ALPHABET)
    group_words = np.frombuffer(parts["group_words"], dtype=np.int32).astype(np.int64)
    loud_mask = np.zeros(max(p.image_tokens, 1), dtype=np.uint8)
    loud_mask[list(p.loud)] = 1
    tiles = sum(_tiles(p))
    out = {"steps": bf16_as_float32(parts["steps"]),
           "freq_table": freq, "starts": (np.cumsum(group_words) - group_words).astype(np.int32),
           "row_bases": (row_classes(p) * p.channels).to(torch.int32).numpy(),
           "loud_mask": loud_mask, "loud": np.array(list(p.loud) or [-1], dtype=np.int64),
           "total_words": np.array([words], dtype=np.int64), "n_esc": np.array([n_esc], dtype=np.int64),
           "flags": np.zeros(2, dtype=np.int32), "esc_first": np.full(tiles, 2 ** 31 - 1, dtype=np.int32),
           "esc_last": np.zeros(tiles, dtype=np.int32), "pred": np.array([pred], dtype=np.float32)}
    if "center" in parts:
        out["center_f32"] = bf16_as_float32(parts["center"])
    return out


def decode(pieces: dict, layout: Layout, geo: Geometry, center: torch.Tensor, reference: torch.Tensor | None,
           keep: bool, out_dtype: torch.dtype, table: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Decode on a CUDA device: `pieces` are the message's parts and decoder_inputs', on
    the device (the words and escapes buffers may be longer than what they hold, as in a
    captured graph's: `total_words` and `n_esc` say how much). gpu.py has checked the
    parts that steer the kernels (tables, word counts, steps, buckets, escapes); a
    corrupt word stream does not raise here: it sets the returned flag (a device tensor
    the caller reads once).
    -> ((B, T, C) in out_dtype, the new reference coefficients when `keep`, flag).
    With `table` (a captured graph's gpu_graphs.AddressTable, on the device): the
    reference is read from, and the new reference and the output written to, the tensors
    it points at when the kernels run; `reference` only says whether there is one, and
    the outputs returned are None."""
    p = layout
    device = pieces["words"].device
    n = p.n_coef
    bad, marks = pieces["flags"][0:1], pieces["flags"][1:2]
    steps_c = pieces["steps"]
    values = entropy_triton.decode(pieces["words"], pieces["total_words"], pieces["starts"], pieces["group_words"],
                                   pieces["states"], pieces["buckets"], pieces["row_bases"],
                                   pieces["freq_table"].view(N_BUCKETS, ALPHABET), geo, bad, marks)
    grid = _Grid(p, device)
    esc = _escape_rows(pieces, grid, values, marks, bad)
    loud_idx = pieces["loud"]
    if table is None:
        new_ref = torch.empty(n, dtype=REF_DTYPE, device=device) if keep else None
        out = torch.empty(p.batch * p.tokens, p.channels, dtype=out_dtype, device=device)
        pointers = (reference if reference is not None else steps_c, new_ref if new_ref is not None else steps_c, out)
    else:
        new_ref = out = None
        pointers = (steps_c, steps_c, steps_c)  # not read: the kernel takes them from the table
    _inverse_kernel[(grid.persistent,)](values, steps_c, *esc, pointers[0], pieces["pred"], pointers[1],
                                        center.contiguous(),
                                        pieces["loud_mask"], loud_idx, len(p.loud), grid.d2,
                                        pointers[2], table if table is not None else steps_c, grid.programs,
                                        HAS_REF=reference is not None, WRITE_REF=keep, THROUGH=table is not None,
                                        OUT_DT=_TRITON_DTYPES[out_dtype], **(grid.args() | {"PREC": INVERSE_PRECISION}))
    return out, new_ref, bad


def _escape_rows(pieces: dict, grid: _Grid, values: torch.Tensor, marks: torch.Tensor, bad: torch.Tensor) -> tuple:
    """-> the inverse kernel's escape arguments: each tile's first listed escape and one
    past its last (an empty run: none; `esc_first` and `esc_last` come in as that), the
    positions and the values. Runs where there are no escapes too: the decoder must have
    marked none."""
    p, device = grid.layout, values.device
    pos, val = pieces["esc_pos"], pieces["esc_val"]
    if pos.numel() == 0:  # (the kernels still take a pointer)
        pos, val = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.float32, device=device)
    n_esc, first, last = pieces["n_esc"], pieces["esc_first"], pieces["esc_last"]
    block = 256
    _escape_rows_kernel[(-(-pos.numel() // block),)](pos, n_esc, values, marks, first, last, bad, pos.numel(),
                                                      p.channels, grid.text_tiles, grid.block_tiles, p.text_rows,
                                                      p.fixed_rows, MARK=ESCAPE_MARK, BLOCK=block)
    return first, last, pos, val
