"""Shared fixtures: tiny FLUX.2 checkpoints written as real .safetensors files."""

from __future__ import annotations

import pytest
import torch

from comfy_mesh.splitter.flux2.config import KNOWN_SIZES, Flux2Config
from comfy_mesh.splitter.flux2.random_weights import write_random_checkpoint

TINY = KNOWN_SIZES["tiny"]
# A guidance-embedding variant (FLUX.2 dev's layout) at tiny size.
TINY_GUIDED = Flux2Config(256, 2, 2, 3, 128, 128, 96, 768, True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-flux2.safetensors"
    return str(write_random_checkpoint(path, TINY, seed=7, dtype=torch.float32))


@pytest.fixture(scope="session")
def tiny_guided_checkpoint(tmp_path_factory) -> str:
    # Under ComfyUI's prefix, as ComfyUI's own single-file saves lay it out.
    path = tmp_path_factory.mktemp("ckpt") / "tiny-flux2-guided.safetensors"
    return str(write_random_checkpoint(path, TINY_GUIDED, seed=11, dtype=torch.float32, prefix="model.diffusion_model."))


# Qt never needs a display in tests: the panel tests run offscreen (set before any QApplication).
import os  # noqa: E402

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
