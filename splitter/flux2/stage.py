"""The part of a FLUX.2 transformer that one node hosts, and how it moves live.

A stage owns blocks `[start, end)` plus exactly the shared layers they need:

- the first stage embeds the inputs (`img_in`, `txt_in`);
- every stage turns the timestep (and guidance) into `vec` (`time_in`, `guidance_in`)
  and the modulations of the block kinds it hosts (`double_stream_modulation_*`,
  `single_stream_modulation`);
- the last stage runs `final_layer` and returns the model output.

Between stages one tensor crosses: the hidden state of all tokens, text first
(B, n_txt + n_img, hidden). In the double-stream phase it is split into its text and
image parts inside the stage, so the wire format is the same on both sides of the
double/single boundary.

Modules are created on the meta device and receive their weights with
`load_state_dict(assign=True)`: no memory is spent on random initial values, and the
tensors that land are exactly the checkpoint's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..plan import BlockRange
from .config import Flux2Config
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, Modulation, SingleStreamBlock, rope_table, timestep_embedding

log = logging.getLogger(__name__)

# (keys) -> {key: tensor on the stage's device and dtype}
WeightLoader = Callable[[list[str]], dict[str, Tensor]]


@dataclass
class StepContext:
    """Per-step inputs every stage derives its conditioning from (all small)."""

    vec: Tensor  # (B, hidden) timestep (+ guidance) embedding
    pe: Tensor  # (B, 1, L, head_dim/2, 2, 2) RoPE table over [text; image] tokens
    n_txt: int  # text tokens at the front of the hidden state
    _mods: dict = field(default_factory=dict)


@dataclass
class RangeChange:
    """What a `set_range` did: keys it loaded, modules it dropped, seconds it took."""

    loaded_keys: list[str] = field(default_factory=list)
    loaded_bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def block_prefix(config: Flux2Config, block: int) -> str:
    """Checkpoint prefix of global block index `block` (execution order)."""
    if block < config.depth_double:
        return f"double_blocks.{block}"
    return f"single_blocks.{block - config.depth_double}"


def parts_for(config: Flux2Config, blocks: BlockRange, first: bool, last: bool) -> list[str]:
    """The shared layers a stage hosting `blocks` needs (see the module docstring)."""
    parts = ["time_in"] + (["guidance_in"] if config.guidance_embed else [])
    if first:
        parts += ["img_in", "txt_in"]
    if len(blocks) and blocks.start < config.depth_double:
        parts += ["double_stream_modulation_img", "double_stream_modulation_txt"]
    if blocks.end > config.depth_double:
        parts += ["single_stream_modulation"]
    if last:
        parts += ["final_layer"]
    return parts


def build_module(config: Flux2Config, name: str) -> nn.Module:
    """An empty (meta-device) module for a block or shared part, named as in the checkpoint."""
    c = config
    with torch.device("meta"):
        if name.startswith("double_blocks."):
            return DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden)
        if name.startswith("single_blocks."):
            return SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden)
        return {
            "img_in": lambda: nn.Linear(c.in_channels, c.hidden_size, bias=False),
            "txt_in": lambda: nn.Linear(c.context_dim, c.hidden_size, bias=False),
            "time_in": lambda: MLPEmbedder(256, c.hidden_size),
            "guidance_in": lambda: MLPEmbedder(256, c.hidden_size),
            "double_stream_modulation_img": lambda: Modulation(c.hidden_size, double=True),
            "double_stream_modulation_txt": lambda: Modulation(c.hidden_size, double=True),
            "single_stream_modulation": lambda: Modulation(c.hidden_size, double=False),
            "final_layer": lambda: LastLayer(c.hidden_size, c.out_channels),
        }[name]()


def module_keys(config: Flux2Config, name: str) -> list[str]:
    """Checkpoint keys of one block or shared part."""
    return [f"{name}.{k}" for k in build_module(config, name).state_dict()]


class Flux2Stage(nn.Module):
    def __init__(self, config: Flux2Config, blocks: BlockRange, *, first: bool, last: bool,
                 load_weights: WeightLoader, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, park_on_cpu: bool = False):
        """`park_on_cpu`: blocks given away stay in CPU RAM for a fast return (the ComfyUI
        side wants this); otherwise they are freed and reloaded from the checkpoint."""
        super().__init__()
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.park_on_cpu = park_on_cpu
        self._load_weights = load_weights
        self._parked: dict[str, nn.Module] = {}
        self.parts = nn.ModuleDict()  # shared layers, keyed by their checkpoint prefix
        self.double_blocks = nn.ModuleDict()  # str(i) -> DoubleStreamBlock
        self.single_blocks = nn.ModuleDict()  # str(i) -> SingleStreamBlock
        self.blocks = BlockRange(0, 0)
        self.first = self.last = False
        self.set_range(blocks, first=first, last=last)

    # ---------------------------------------------------------------- hosting

    def _container(self, name: str) -> tuple[nn.ModuleDict, str]:
        if name.startswith("double_blocks."):
            return self.double_blocks, name.split(".", 1)[1]
        if name.startswith("single_blocks."):
            return self.single_blocks, name.split(".", 1)[1]
        return self.parts, name

    def hosted_modules(self) -> list[str]:
        return ([f"double_blocks.{k}" for k in self.double_blocks] + [f"single_blocks.{k}" for k in self.single_blocks]
                + list(self.parts))

    def set_range(self, blocks: BlockRange, *, first: bool | None = None, last: bool | None = None) -> RangeChange:
        """Host `blocks` (and the shared parts they need) from now on; load and drop live."""
        t0 = time.perf_counter()
        first = self.first if first is None else first
        last = self.last if last is None else last
        if blocks.end > self.config.n_blocks:
            raise PlanError(f"block range {blocks} exceeds the model's {self.config.n_blocks} blocks")
        wanted = [block_prefix(self.config, b) for b in blocks] + parts_for(self.config, blocks, first, last)
        current = set(self.hosted_modules())
        change = RangeChange()

        # Everything new is made ready first, and only then swapped in: if loading fails
        # (a full GPU, a bad file) the stage still hosts exactly what it hosted before.
        # A tail stage only grows or shrinks at a time, so this adds little to the peak.
        incoming: dict[str, nn.Module] = {}
        to_load: dict[str, nn.Module] = {}
        for name in wanted:
            if name in current:
                continue
            if name in self._parked:
                incoming[name] = self._parked[name].to(self.device)
            else:
                incoming[name] = to_load[name] = build_module(self.config, name)
        if to_load:
            keys = [f"{name}.{k}" for name, m in to_load.items() for k in m.state_dict()]
            tensors = self._load_weights(keys)
            for name, module in to_load.items():
                sub = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(name + ".")]}
                module.load_state_dict(sub, strict=True, assign=True)
                change.loaded_bytes += sum(t.numel() * t.element_size() for t in sub.values())
            change.loaded_keys = keys

        for name in sorted(current - set(wanted)):
            container, key = self._container(name)
            module = container.pop(key)
            if self.park_on_cpu:
                self._parked[name] = module.to("cpu")
            change.dropped.append(name)
        for name, module in incoming.items():
            self._parked.pop(name, None)
            container, key = self._container(name)
            container[key] = module
        self.blocks, self.first, self.last = blocks, first, last
        if change.dropped and self.device.type == "cuda":
            torch.cuda.empty_cache()
        change.seconds = time.perf_counter() - t0
        log.info("stage now hosts %s (first=%s last=%s): loaded %d tensors (%.1f MB), dropped %d modules in %.2f s",
                 blocks, first, last, len(change.loaded_keys), change.loaded_bytes / 1e6, len(change.dropped),
                 change.seconds)
        return change

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ---------------------------------------------------------------- compute

    @torch.inference_mode()
    def context(self, timestep: Tensor, guidance: Tensor | None, txt_ids: Tensor, img_ids: Tensor,
                pe: Tensor | None = None) -> StepContext:
        """Conditioning for one step. `pe` may be passed in when cached by the caller."""
        dt = self.dtype
        vec = self.parts["time_in"](timestep_embedding(timestep.to(self.device)).to(dt))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.2 checkpoint embeds guidance: pass a guidance scale")
            vec = vec + self.parts["guidance_in"](timestep_embedding(guidance.to(self.device)).to(dt))
        if pe is None:
            pe = self.rope(txt_ids, img_ids)
        return StepContext(vec=vec, pe=pe, n_txt=txt_ids.shape[1])

    def rope(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        ids = torch.cat((txt_ids, img_ids), dim=1).to(self.device)
        return rope_table(ids, self.config.axes_dim, self.config.theta)

    def _mods(self, ctx: StepContext, name: str):
        if name not in ctx._mods:
            ctx._mods[name] = self.parts[name](ctx.vec)
        return ctx._mods[name]

    @torch.inference_mode()
    def embed(self, img: Tensor, txt: Tensor) -> Tensor:
        """First stage only: latent tokens (B, n_img, C) and text (B, n_txt, ctx) -> hidden."""
        img = self.parts["img_in"](img.to(self.device, self.dtype))
        txt = self.parts["txt_in"](txt.to(self.device, self.dtype))
        return torch.cat((txt, img), dim=1)

    @torch.inference_mode()
    def run_blocks(self, hidden: Tensor, ctx: StepContext) -> Tensor:
        """Run this stage's blocks in order on the hidden state [text; image]."""
        c = self.config
        hidden = hidden.to(self.device, self.dtype)
        doubles = [b for b in self.blocks if b < c.depth_double]
        if doubles:
            img_mod = self._mods(ctx, "double_stream_modulation_img")
            txt_mod = self._mods(ctx, "double_stream_modulation_txt")
            txt, img = hidden[:, :ctx.n_txt], hidden[:, ctx.n_txt:]
            for b in doubles:
                img, txt = self.double_blocks[str(b)](img, txt, img_mod, txt_mod, ctx.pe)
            hidden = torch.cat((txt, img), dim=1)
        singles = [b - c.depth_double for b in self.blocks if b >= c.depth_double]
        if singles:
            (mod,) = self._mods(ctx, "single_stream_modulation")
            for i in singles:
                hidden = self.single_blocks[str(i)](hidden, mod, ctx.pe)
        return hidden

    @torch.inference_mode()
    def finish(self, hidden: Tensor, ctx: StepContext) -> Tensor:
        """Last stage only: final layer over the image tokens -> (B, n_img, out_channels)."""
        return self.parts["final_layer"](hidden[:, ctx.n_txt:], ctx.vec)

    @torch.inference_mode()
    def forward(self, img: Tensor, txt: Tensor, timestep: Tensor, img_ids: Tensor, txt_ids: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """The whole model, when this stage hosts all of it (first, last, every block)."""
        if not (self.first and self.last and len(self.blocks) == self.config.n_blocks):
            raise RuntimeError(f"forward() needs the whole model; this stage hosts {self.blocks}")
        ctx = self.context(timestep, guidance, txt_ids, img_ids)
        return self.finish(self.run_blocks(self.embed(img, txt), ctx), ctx)


def image_ids(batch: int, height: int, width: int, axes: int = 4) -> Tensor:
    """Position ids of a (height x width) grid of image tokens: (B, h*w, axes), axis 0 = time."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(1, height * width, axes).expand(batch, -1, -1).contiguous()


def text_ids(batch: int, n_txt: int, axes: int = 4) -> Tensor:
    """Position ids of text tokens: FLUX.2 numbers them on the last axis."""
    ids = torch.zeros(batch, n_txt, axes)
    ids[..., axes - 1] = torch.arange(n_txt, dtype=torch.float32)
    return ids

