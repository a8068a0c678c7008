"""Entropy coding for the `gpu` codec: hybrid tokens and interleaved rANS, vectorised.

Quantised integers are split into a small *token* (coded with rANS under one of a few
context tables) and *raw bits* (sign and low mantissa bits, pushed through the same
rANS state at uniform probability):

    |q| < 16         -> token |q|,                raw: sign
    |q| in [2^e, 2^(e+1)), e = 4..14
                     -> token 16 + 2(e-4) + b,    raw: e-1 low bits, sign
                        (b: the bit below the leading one)
    |q| >= 2^15      -> token ESCAPE; the value travels exactly beside the stream

(|q| < 2^15: the fused encoder keeps its quantised values in int16.)

rANS state is 32 bits in [2^16, 2^32), renormalised by 16-bit words, 14-bit
probabilities. Symbols are coded by `groups x lanes` independent states: step `i` of
group `g` codes symbols `(g*steps + i)*lanes + j` for lanes `j`, so every step touches a
contiguous run (coalesced on a GPU). Each group owns one word stream; within a step, the
words of the lanes that renormalise are stored in lane order, found by a prefix sum, so
no per-lane offsets need to be sent. The encoder runs steps backwards and the decoder
forwards, reading each group's stream from its end.

This module is the reference implementation in torch ops (CPU or GPU); a fused GPU
kernel must produce the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 14 bits: a symbol the table must allow but the (sampled) counts did not see costs
# 1/16384 of the probability; at 12 bits the 38 such symbols of a peaked table took 1 %.
PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16  # rANS state lower bound L; words are 16 bits
EXACT_TOKENS = 16
MAX_EXP = 14  # |q| < 2^15 is tokenised; larger values escape
ESCAPE = EXACT_TOKENS + 2 * (MAX_EXP - 3)  # 38
ALPHABET = ESCAPE + 1
_POW2 = torch.tensor([1 << e for e in range(4, MAX_EXP + 2)], dtype=torch.int64)  # 16 .. 2^15


# ---------------------------------------------------------------- tokens


def tokenize(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 values -> (token, n_raw_bits, raw_bits), all int64 of q's shape."""
    v = q.abs()
    sign = (q < 0).to(torch.int64)
    # e = floor(log2 v) for v >= 16, exactly, by counting powers of two at or below v.
    e = 3 + torch.bucketize(v, _POW2.to(v.device), right=True)
    big = v >= EXACT_TOKENS
    escape = v >= (1 << (MAX_EXP + 1))
    e_clamped = e.clamp(4, MAX_EXP)
    mant_bits = e_clamped - 1
    token = torch.where(big, EXACT_TOKENS + 2 * (e_clamped - 4) + ((v >> mant_bits) & 1), v)
    token = torch.where(escape, torch.full_like(token, ESCAPE), token)
    low = v & ((torch.ones_like(v) << mant_bits) - 1)
    raw = torch.where(big, (low << 1) | sign, sign)
    n_raw = torch.where(big, e_clamped, (v > 0).to(torch.int64))
    n_raw = torch.where(escape, torch.zeros_like(n_raw), n_raw)
    raw = torch.where(escape, torch.zeros_like(raw), raw)
    return token, n_raw, raw


def token_raw_bits(token: torch.Tensor) -> torch.Tensor:
    """How many raw bits follow a token (0 for 0 and ESCAPE)."""
    e = (token - EXACT_TOKENS) // 2 + 4
    n = torch.where(token >= EXACT_TOKENS, e, (token > 0).to(torch.int64))
    return torch.where(token == ESCAPE, torch.zeros_like(n), n)


def detokenize(token: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """(token, raw_bits) -> int64 values; ESCAPE positions come back as 0."""
    big = token >= EXACT_TOKENS
    e = (token - EXACT_TOKENS) // 2 + 4
    mant_bits = (e - 1).clamp(min=0)
    lead = torch.where(big, (torch.ones_like(token) << e) | (((token - EXACT_TOKENS) & 1) << mant_bits), token)
    low = torch.where(big, raw >> 1, torch.zeros_like(raw))
    v = torch.where(big, lead | low, token)
    v = torch.where(token == ESCAPE, torch.zeros_like(v), v)
    return torch.where((raw & 1).bool() & (v > 0), -v, v)


# ---------------------------------------------------------------- frequency tables


def normalize_counts(counts: torch.Tensor) -> torch.Tensor:
    """(tables, ALPHABET) counts -> frequencies summing to PROB_SCALE per used table.

    Every symbol seen gets at least 1; unused tables stay all zero.
    """
    counts = counts.to(torch.int64)
    total = counts.sum(-1, keepdim=True)
    freq = counts * PROB_SCALE // total.clamp(min=1)
    freq = torch.where((counts > 0) & (freq == 0), torch.ones_like(freq), freq)
    deficit = torch.where(total.squeeze(-1) > 0, PROB_SCALE - freq.sum(-1), torch.zeros_like(total.squeeze(-1)))
    top = freq.argmax(-1)
    # The deficit is at least -ALPHABET (each symbol rounded up by at most 1) and the most
    # frequent symbol holds at least PROB_SCALE / ALPHABET > ALPHABET: it stays positive.
    # (No check here: it would cost the GPU encoder a host round trip.)
    freq[torch.arange(freq.shape[0], device=freq.device), top] += deficit
    return freq


def cumulative(freq: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(freq, -1) - freq


def slot_table(freq: torch.Tensor) -> torch.Tensor:
    """(tables, PROB_SCALE) slot -> symbol, for decoding. Unused tables map to 0.

    One batched search over the cumulative frequencies: no per-table loop, no host sync.
    """
    tables = freq.shape[0]
    slots = torch.arange(PROB_SCALE, device=freq.device).expand(tables, PROB_SCALE).contiguous()
    symbol = torch.searchsorted(torch.cumsum(freq, -1).contiguous(), slots, right=True)
    return torch.where(symbol < ALPHABET, symbol, torch.zeros_like(symbol))


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """How n symbols are spread over groups x steps x lanes (padding at the end)."""

    n: int
    lanes: int
    steps: int
    groups: int

    @classmethod
    def for_count(cls, n: int, lanes: int = 32, min_steps: int = 1024, max_steps: int = 4096,
                  target_groups: int = 512) -> "Geometry":
        """Enough groups for a GPU to run in parallel on big tensors, enough steps per lane
        that the final states (4 bytes a lane) stay a small share of the stream."""
        steps = -(-n // (lanes * target_groups))
        steps = max(1, min(-(-n // lanes), max(min_steps, min(max_steps, steps))))
        groups = max(1, -(-n // (lanes * steps)))
        return cls(n, lanes, steps, groups)

    @property
    def padded(self) -> int:
        return self.groups * self.steps * self.lanes


def _to_grid(x: torch.Tensor, geo: Geometry, fill: int) -> torch.Tensor:
    """(n,) -> (groups, steps, lanes), padded with `fill`."""
    pad = geo.padded - geo.n
    if pad:
        x = torch.cat([x, torch.full((pad,), fill, dtype=x.dtype, device=x.device)])
    return x.view(geo.groups, geo.steps, geo.lanes)


# ---------------------------------------------------------------- rANS


@dataclass
class RansStreams:
    words: torch.Tensor  # uint16-valued int64, all groups' streams concatenated
    group_words: torch.Tensor  # (groups,) words per group
    states: torch.Tensor  # (groups, lanes) final encoder states


def rans_encode(token: torch.Tensor, n_raw: torch.Tensor, raw: torch.Tensor, ctx: torch.Tensor,
                freq: torch.Tensor, geo: Geometry) -> RansStreams:
    """Encode symbols (each (n,) int64) with per-symbol context tables `freq[ctx]`."""
    device = token.device
    cum = cumulative(freq)
    # Padding symbols: token 0 of context 0 would need freq > 0 there; code them with a
    # raw push of 0 bits and "token" through a dedicated always-valid path instead:
    # they use n_raw = 0 and are skipped for the token push (valid = False).
    valid = _to_grid(torch.ones_like(token, dtype=torch.bool), geo, 0).bool()
    tok = _to_grid(token, geo, 0)
    nr = _to_grid(n_raw, geo, 0)
    rb = _to_grid(raw, geo, 0)
    cx = _to_grid(ctx, geo, 0)
    G, S, W = geo.groups, geo.steps, geo.lanes
    x = torch.full((G, W), STATE_LOW, dtype=torch.int64, device=device)
    buf = torch.zeros(G, 2 * S * W, dtype=torch.int64, device=device)
    ptr = torch.zeros(G, dtype=torch.int64, device=device)
    rows = torch.arange(G, device=device)[:, None].expand(G, W)

    def emit(need: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal ptr
        pos = ptr[:, None] + torch.cumsum(need.to(torch.int64), 1) - 1
        buf[rows[need], pos[need]] = x[need] & 0xFFFF
        ptr = ptr + need.sum(1)
        return torch.where(need, x >> 16, x)

    for i in range(S - 1, -1, -1):
        # raw bits first (the decoder pops them after the token)
        n = nr[:, i]
        x = emit(x >= (torch.ones_like(n) << (32 - n)), x)
        x = (x << n) | rb[:, i]
        # then the token
        v = valid[:, i]
        f = freq[cx[:, i], tok[:, i]]
        c = cum[cx[:, i], tok[:, i]]
        f = torch.where(v, f, torch.ones_like(f))
        need = v & (x >= (f << (32 - PROB_BITS)))
        x = emit(need, x)
        x = torch.where(v, ((x // f) << PROB_BITS) + (x % f) + c, x)

    counts = ptr
    mask = torch.arange(buf.shape[1], device=device)[None, :] < counts[:, None]
    return RansStreams(words=buf[mask], group_words=counts, states=x)


def rans_decode(streams: RansStreams, ctx: torch.Tensor, freq: torch.Tensor, geo: Geometry,
                n_symbols_valid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `rans_encode`: -> (token, raw) as (n,) int64."""
    device = ctx.device
    G, S, W = geo.groups, geo.steps, geo.lanes
    cum = cumulative(freq)
    slots = slot_table(freq)
    cx = _to_grid(ctx, geo, 0)
    valid = _to_grid(torch.ones(geo.n, dtype=torch.bool, device=device), geo, 0).bool()
    starts = torch.cumsum(streams.group_words, 0) - streams.group_words
    words = streams.words
    ptr = starts + streams.group_words  # read each group's stream from its end
    x = streams.states.clone()
    tok_out = torch.zeros(G, S, W, dtype=torch.int64, device=device)
    raw_out = torch.zeros(G, S, W, dtype=torch.int64, device=device)

    def refill(need: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal ptr
        count = need.sum(1)
        start = ptr - count
        pos = start[:, None] + torch.cumsum(need.to(torch.int64), 1) - 1
        if bool((start < starts).any()):
            raise ValueError("rANS stream exhausted: the message is truncated or corrupt")
        fill = torch.zeros_like(x)
        fill[need] = words[pos[need]]
        ptr = start
        return torch.where(need, (x << 16) | fill, x)

    for i in range(S):
        v = valid[:, i]
        c_idx = cx[:, i]
        slot = x & (PROB_SCALE - 1)
        t = slots[c_idx, slot]
        f = freq[c_idx, t]
        if bool((v & (f == 0)).any()):
            raise ValueError("rANS decoded a symbol its table does not have: corrupt message")
        x_new = f * (x >> PROB_BITS) + slot - cum[c_idx, t]
        x = torch.where(v, x_new, x)
        x = refill(v & (x < STATE_LOW), x)
        tok_out[:, i] = torch.where(v, t, torch.zeros_like(t))
        n = torch.where(v, token_raw_bits(t), torch.zeros_like(t))
        raw_out[:, i] = x & ((torch.ones_like(n) << n) - 1)
        x = x >> n
        x = refill(x < STATE_LOW, x)
    if bool((x != STATE_LOW).any()) or bool((ptr != starts).any()):
        raise ValueError("rANS stream did not end where it began: the message is corrupt")
    return tok_out.reshape(-1)[: geo.n], raw_out.reshape(-1)[: geo.n]
