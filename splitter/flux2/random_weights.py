"""Seeded random FLUX.2 weights in checkpoint key names: the demo's and tests' model.

Each tensor is drawn from its own generator seeded by (seed, key), so any subset of
keys can be made independently and two processes that make the same key get the same
values: a daemon can host a random-weight model's tail without a file.
"""

from __future__ import annotations

import zlib

import torch
from ..checkpoint import write_safetensors
from .config import Flux2Config
from .stage import block_prefix, build_module, parts_for
from ..plan import BlockRange


def checkpoint_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every key of a FLUX.2 checkpoint of this config, with its shape."""
    whole = BlockRange(0, config.n_blocks)
    names = [block_prefix(config, b) for b in whole] + parts_for(config, whole, True, True)
    return {f"{name}.{k}": tuple(v.shape) for name in names for k, v in build_module(config, name).state_dict().items()}


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """A weight with the scale a trained model roughly has: unit norms, 1/sqrt(fan_in) linears."""
    if key.endswith(".scale"):
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = fan_in ** -0.5
    if "modulation" in key:
        std *= 0.5  # keep gates and scales modest so deep random stacks stay finite
    return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)


def random_checkpoint(config: Flux2Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: random_tensor(k, s, seed, dtype) for k, s in checkpoint_shapes(config).items()}


def write_random_checkpoint(path, config: Flux2Config, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            prefix: str = ""):
    """Write a seeded random FLUX.2 checkpoint in BFL/ComfyUI key names (a real .safetensors)."""
    metadata = {"comfy_mesh_random_seed": str(seed), "comfy_mesh_config": str(config.to_dict())}
    write_safetensors(path, random_checkpoint(config, seed, dtype, prefix), metadata=metadata)
    return path
