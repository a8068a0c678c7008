"""Flow-matching Euler sampling, the loop FLUX.2 is run with."""

from __future__ import annotations

from typing import Callable

import torch


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """`steps + 1` sigmas from 1 to 0; `shift` > 1 spends more steps at high noise."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def euler_sample(model: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
                 sigmas: torch.Tensor, on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i): `model(x, sigma (B,), i)` returns v."""
    x = noise
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0])
        v = model(x, sigma, i)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
        if on_step is not None:
            on_step(i, x)
    return x
