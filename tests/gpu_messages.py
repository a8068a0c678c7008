"""Reading the `gpu` codec's messages in tests: its parts, and what its step sizes promise."""

from __future__ import annotations

import math

import torch

from comfy_mesh.codec import EncodedTensor
from comfy_mesh.codec.gpu import GpuSettings
from comfy_mesh.codec.gpu_layout import FINEST_STEP, channel_centre, channel_spread, sample_rows


def message_part(msg: EncodedTensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One part of a message as a CPU tensor of `dtype` (a copy: received buffers are read-only)."""
    return torch.frombuffer(bytearray(bytes(msg.buffers[list(msg.header["parts"]).index(name)])), dtype=dtype)


def assert_steps_at_their_floors(msg: EncodedTensor, x: torch.Tensor,
                                 channel_rel_err: float = GpuSettings.channel_rel_err) -> int:
    """A key message's channel steps are the global step, or where a channel's own error
    limit (channel_rel_err x its spread, as a uniform quantiser's RMS error) asks for a
    finer one, the bf16 value just under that limit: not a power of two finer, as format 4
    had them. -> how many channels got a finer step."""
    steps = message_part(msg, "steps", torch.bfloat16).float()
    step = msg.header["step"]
    rows = sample_rows(x.to(torch.float32).reshape(-1, x.shape[-1]))
    spread = channel_spread(rows - channel_centre(rows)).cpu()
    limit = torch.where(spread > 0, channel_rel_err * math.sqrt(12.0) * spread, math.inf)
    limit = torch.maximum(limit, torch.full_like(limit, step * FINEST_STEP))
    finer = steps < step
    assert bool((steps <= step).all())
    # bf16 keeps 8 significant bits: truncated, a step is within 2^-7 under its limit
    # (1e-5: the fused encoder's spread may differ from torch's in the last bits)
    assert bool((steps[finer] <= limit[finer] * (1 + 1e-5)).all()), (steps[finer], limit[finer])
    assert bool((steps[finer] >= limit[finer] * (1 - 2 ** -7) * (1 - 1e-5)).all()), (steps[finer], limit[finer])
    assert bool((limit[~finer] >= step * (1 - 1e-5)).all())  # the global step was fine enough for the rest
    return int(finer.sum())
