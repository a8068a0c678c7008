"""FLUX.2 architecture hyper-parameters, inferred from a checkpoint's tensor shapes.

Every size comes from a shape, never from a table: the same code serves FLUX.2 dev
(hidden 6144), Klein 9B (4096), Klein 4B (3072) and the tiny test models.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from ..errors import ModelFormatError

# Markers that identify a FLUX.2 transformer among BFL/ComfyUI-named checkpoints: global
# modulation (FLUX.1 has per-block modulation instead) plus a double block's QK norm.
FLUX2_MARKER_KEYS = ("double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.norm.query_norm.scale")

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")


@dataclass(frozen=True)
class Flux2Config:
    """Sizes of a FLUX.2 transformer. Units: channels or counts unless stated."""

    hidden_size: int  # channels per token inside the blocks
    num_heads: int  # attention heads; head_dim = hidden_size / num_heads
    depth_double: int  # double-stream blocks (run first)
    depth_single: int  # single-stream blocks (run after the double blocks)
    in_channels: int  # latent channels per image token (128 for FLUX.2)
    out_channels: int  # model output channels per image token
    context_dim: int  # text-encoder channels per text token
    mlp_hidden: int  # SwiGLU hidden width (3 x hidden for FLUX.2)
    guidance_embed: bool  # FLUX.2 dev embeds a guidance scale; Klein does not
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per position axis (t, h, w, text index)
    theta: float = 2000.0  # RoPE base

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def n_blocks(self) -> int:
        """Blocks in execution order: double blocks, then single blocks."""
        return self.depth_double + self.depth_single

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Flux2Config":
        d = dict(d)
        d["axes_dim"] = tuple(d.get("axes_dim", (32, 32, 32, 32)))
        return cls(**d)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "Flux2Config":
        """Infer the config from `{key: shape}` (prefix already stripped)."""
        missing = [k for k in FLUX2_MARKER_KEYS + ("img_in.weight", "txt_in.weight", "final_layer.linear.weight")
                   if k not in shapes]
        if missing:
            raise ModelFormatError(
                f"not a FLUX.2 transformer checkpoint: missing {', '.join(missing)}. "
                "comfy-mesh expects BFL/ComfyUI key names (double_blocks.N..., single_blocks.N...), "
                "optionally under 'model.diffusion_model.'"
            )
        hidden, in_channels = shapes["img_in.weight"]
        _, context_dim = shapes["txt_in.weight"]
        out_channels, _ = shapes["final_layer.linear.weight"]
        (head_dim,) = shapes["double_blocks.0.img_attn.norm.query_norm.scale"]
        if hidden % head_dim:
            raise ModelFormatError(f"hidden size {hidden} is not a multiple of the head size {head_dim}")
        depth_double = 1 + max(int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k)))
        singles = [int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))]
        depth_single = 1 + max(singles) if singles else 0
        # SwiGLU: img_mlp.0 projects to 2 x mlp_hidden (gate and value), img_mlp.2 back from mlp_hidden.
        _, mlp_hidden = shapes["double_blocks.0.img_mlp.2.weight"]
        if head_dim % 4 or (head_dim // 4) % 2:
            raise ModelFormatError(f"head size {head_dim} cannot be split into 4 even RoPE axes")
        return cls(
            hidden_size=int(hidden),
            num_heads=int(hidden // head_dim),
            depth_double=depth_double,
            depth_single=depth_single,
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            context_dim=int(context_dim),
            mlp_hidden=int(mlp_hidden),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            axes_dim=(head_dim // 4,) * 4,
        )


# Sizes of the real models, for docs, benchmarks and random-weight stand-ins. Loading never
# uses these: a checkpoint's own shapes decide.
KNOWN_SIZES: dict[str, Flux2Config] = {
    "flux2-dev": Flux2Config(6144, 48, 8, 48, 128, 128, 15360, 18432, True),
    "flux2-klein-9b": Flux2Config(4096, 32, 8, 24, 128, 128, 12288, 12288, False),
    "flux2-klein-4b": Flux2Config(3072, 24, 5, 20, 128, 128, 7680, 9216, False),
    # The tiny model the demo and tests build: ComfyUI-loadable (head size 128, 4 x 32 RoPE).
    "tiny": Flux2Config(256, 2, 2, 3, 128, 128, 96, 768, False),
}
