"""A model checkpoint a node serves: which family, which sizes, which file.

`open_model(spec)` resolves a local path or `hf://` reference, reads only the header,
recognises the family from key names and infers its config from tensor shapes. Block
weights are read later, and only those a stage hosts (`ModelFile.stage`).
"""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass

import torch

from .checkpoint import ProgressCallback, SafetensorsCheckpoint, resolve_checkpoint, tqdm_progress
from .errors import ModelFormatError
from .flux2.config import FLUX2_MARKER_KEYS, KNOWN_SIZES, Flux2Config
from .flux2.random_weights import write_random_checkpoint
from .flux2.stage import Flux2Stage, WeightLoader
from .plan import BlockRange

log = logging.getLogger(__name__)

FAMILIES = ("flux2",)


@dataclass
class ModelFile:
    spec: str  # what the user named: a path or hf://org/repo/file.safetensors
    path: pathlib.Path
    family: str
    config: Flux2Config
    fingerprint: str
    checkpoint: SafetensorsCheckpoint

    def loader(self, device: torch.device | str, dtype: torch.dtype, show_progress: bool = False,
               on_progress: ProgressCallback | None = None) -> WeightLoader:
        """A stage's weight loader: reads only the keys asked for. `show_progress` draws a
        byte progress bar on a terminal; `on_progress(done, total, key)` hears the same."""
        def load(keys: list[str]) -> dict[str, torch.Tensor]:
            bar = tqdm_progress(f"loading {len(keys)} tensors") if show_progress else None

            def progress(done: int, total: int, key: str) -> None:
                for listener in (bar, on_progress):
                    if listener is not None:
                        listener(done, total, key)

            return self.checkpoint.load(keys, device=device, dtype=dtype, progress=progress)
        return load

    def stage(self, blocks: BlockRange, *, first: bool, last: bool, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, park_on_cpu: bool = False, show_progress: bool = False,
              on_progress: ProgressCallback | None = None) -> Flux2Stage:
        return Flux2Stage(self.config, blocks, first=first, last=last,
                          load_weights=self.loader(device, dtype, show_progress, on_progress), device=device,
                          dtype=dtype, park_on_cpu=park_on_cpu)

    def close(self) -> None:
        self.checkpoint.close()


TINY_SPEC = "tiny"


def tiny_checkpoint_path(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The seeded tiny FLUX.2 checkpoint (2 double + 3 single blocks, hidden 256), written
    once into the cache. The same seed gives the same file, hence the same fingerprint, on
    every machine: a demo and a daemon on two PCs agree on it without copying a file."""
    base = pathlib.Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    path = base / "comfy-mesh" / f"tiny-flux2-seed{seed}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(path, KNOWN_SIZES["tiny"], seed=seed)
    return path


def model_path(spec: str) -> pathlib.Path:
    """A model spec -> a local file: a path, hf://ORG/REPO/file.safetensors, or tiny[:SEED]."""
    if spec == TINY_SPEC or spec.startswith(TINY_SPEC + ":"):
        seed = spec.partition(":")[2] or "0"
        if not seed.isdigit():
            raise ModelFormatError(f"tiny model seed must be a number, as in tiny:3; got {spec!r}")
        return tiny_checkpoint_path(int(seed))
    return resolve_checkpoint(spec)


def open_model(spec: str) -> ModelFile:
    path = model_path(spec)
    checkpoint = SafetensorsCheckpoint(path, markers=FLUX2_MARKER_KEYS)
    try:
        shapes = {k: checkpoint.shape(k) for k in checkpoint.logical_keys()}
        config = Flux2Config.from_shapes(shapes)
        fingerprint = checkpoint.fingerprint()
    except BaseException:
        checkpoint.close()
        raise
    log.info("%s: FLUX.2, hidden %d, %d double + %d single blocks, fingerprint %s", path.name, config.hidden_size,
             config.depth_double, config.depth_single, fingerprint[:12])
    return ModelFile(str(spec), path, "flux2", config, fingerprint, checkpoint)


def dtype_from_name(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelFormatError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]
