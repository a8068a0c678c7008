"""Robust per-channel statistics shared by the CPU-side codecs (cpu, x265, nvenc packing).

Median centre and median-absolute-deviation spread, so that one loud token cannot move
a channel's scale the way min/max would (DESIGN.md: scale by a robust spread, carry
outliers exactly). The gpu codec computes the same quantities with torch ops on the
tensor's device (codec/gpu.py); these use numpy's introselect on the host.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import CodecError

#: 1 / Phi^-1(3/4): turns a median absolute deviation into a Gaussian standard deviation.
MAD_TO_SIGMA = 1.4826
#: sqrt(pi / 2): turns a mean absolute deviation into a Gaussian standard deviation; used
#: only where more than half of a channel equals its median, so that the MAD is 0.
MEAN_AD_TO_SIGMA = 1.2533
#: Largest magnitude accepted: keeps every square and product finite in float32.
MAX_ABS = 2.0**60


def setting_number(value: Any, codec: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"{codec} codec setting {what} must be a number, got {value!r}")
    return float(value)


def setting_int(value: Any, codec: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{codec} codec setting {what} must be an int, got {value!r}")
    return value


def check_values(x: torch.Tensor, codec: str) -> None:
    """Finite and not absurdly large; CodecError otherwise."""
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x))  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CodecError(
            f"{codec} codec: the tensor holds NaN or Inf values; these cannot be quantised "
            "(find where the model overflowed, or send it with the raw codec)"
        )
    if max(-lo, hi) > MAX_ABS:
        raise CodecError(
            f"{codec} codec: the tensor holds a value of magnitude {max(-lo, hi):.3g}, beyond "
            f"the {MAX_ABS:.3g} this codec handles; send it with the raw codec"
        )


def lower_median(rows: torch.Tensor) -> torch.Tensor:
    """Per-row lower median (what torch.median returns), by numpy's introselect.

    np.partition measured about as fast as torch.median on random rows, and stays fast
    on rows full of ties (bfloat16 inputs), where torch.median slowed down several-fold
    in one measurement. Partitions a scratch copy.
    """
    k = (rows.shape[1] - 1) // 2
    return torch.from_numpy(np.partition(rows.numpy(), k, axis=1)[:, k].copy())


def channel_stats(x: torch.Tensor, stats_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel median and robust spread (1.4826 x MAD) of x (rows, channels), from at
    most `stats_tokens` evenly spaced rows (0: all). Sampling only moves the step and the
    outlier threshold; the error a message states is computed over every value."""
    rows, channels = x.shape
    if rows == 0:
        return torch.zeros(channels), torch.zeros(channels)
    if stats_tokens and rows > stats_tokens:
        sample = x.index_select(0, torch.linspace(0, rows - 1, stats_tokens).round().long())
    else:
        sample = x
    # A private channel-major copy (selection along contiguous rows is much faster;
    # `.contiguous()` could return a view of x itself when there is one token).
    by_channel = torch.empty((channels, sample.shape[0]), dtype=torch.float32)
    by_channel.copy_(sample.t())
    centers = lower_median(by_channel)
    by_channel.sub_(centers[:, None]).abs_()
    return centers, lower_median(by_channel) * MAD_TO_SIGMA


def fallback_spread(spread: torch.Tensor, absdev: torch.Tensor, maxdev: torch.Tensor) -> torch.Tensor:
    """Replace a zero MAD in a channel that is not constant.

    More than half of such a channel equals its median (a sparse channel); its mean
    absolute deviation, scaled to a Gaussian sigma, gives a usable step instead of
    turning every other value into an outlier. Failing that, its largest deviation.
    """
    bad = (spread == 0) & (maxdev > 0)
    if not bool(bad.any()):
        return spread
    cols = bad.nonzero().view(-1)
    fixed = spread.clone()
    mean_ad = absdev.index_select(1, cols).mean(dim=0) * MEAN_AD_TO_SIGMA
    fixed[cols] = torch.where(mean_ad > 0, mean_ad, maxdev[cols])
    return fixed
