"""FLUX.2 (dev, Klein 9B, Klein 4B and smaller): config, layers, key ownership, stage."""

from .config import Flux2Config
from .stage import Flux2Stage

__all__ = ["Flux2Config", "Flux2Stage"]
