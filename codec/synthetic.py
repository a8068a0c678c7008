"""Synthetic activation-like tensors, shared by the codec tests and benchmarks.

Real transformer hidden states are not i.i.d. Gaussian: per-channel scales spread over
orders of magnitude, a few "massive" channels sit on a large constant offset, some
tokens (register-like ones) carry far more energy than the rest, and values within a
channel have heavy tails. A codec judged only on `torch.randn` would hide exactly the
failure modes (min/max scaling, lost outliers) that matter, so this generator builds
all four in, deterministically from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationShape:
    """What `activation_like` builds; every field has a default that looks like a DiT."""

    tokens: int = 4608            # sequence length (text + image tokens)
    channels: int = 256           # hidden size
    massive_channels: int = 3     # channels on a large DC offset (count)
    massive_offset: float = 80.0  # their offset, in units of the median channel scale
    loud_tokens: int = 4          # tokens with much larger norm (count)
    loud_gain: float = 30.0       # how much larger (factor)
    tail_df: float = 5.0          # Student-t degrees of freedom of the values (lower: heavier tails)


def activation_like(spec: ActivationShape = ActivationShape(), seed: int = 0) -> torch.Tensor:
    """A float32 (tokens, channels) tensor with activation-like structure."""
    g = torch.Generator().manual_seed(seed)
    t, c = spec.tokens, spec.channels
    # Student-t values: normal / sqrt(chi2 / df), chi2 drawn as a Gamma.
    normal = torch.randn(t, c, generator=g)
    chi2 = torch._standard_gamma(torch.full((t, c), spec.tail_df / 2), generator=g) * 2
    values = normal / torch.sqrt(chi2 / spec.tail_df)
    # Log-normal per-channel scales (a heavy-tailed spread over ~2 orders of magnitude)
    # and small per-channel offsets.
    scale = torch.exp(torch.randn(c, generator=g))
    offset = 0.3 * torch.randn(c, generator=g) * scale
    x = values * scale + offset
    massive = torch.randperm(c, generator=g)[: spec.massive_channels]
    x[:, massive] += spec.massive_offset * float(scale.median())
    loud = torch.randperm(t, generator=g)[: spec.loud_tokens]
    x[loud] *= spec.loud_gain
    return x
