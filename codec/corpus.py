"""An activation corpus that stands in for real DiT hidden states, for codec work.

Real FLUX.2 activations are not available offline (no weights in tests), and i.i.d.
Gaussians would flatter a codec in some ways (no outliers) and wrong it in others (no
spatial or temporal redundancy to exploit). This corpus builds in what matters for
compression, each piece for a reason:

- image tokens on the latent grid, spatially correlated (a Gaussian-smoothed field,
  correlation length ~3 tokens, plus a white part): a DiT's hidden state at an image
  token resembles its neighbours', which a codec can predict or transform away;
- text tokens ahead of them, with no spatial structure (they are padded prompt tokens);
- heavy-tailed per-channel scales (log-normal, ~2 orders of magnitude) and Student-t
  values: a per-tensor min/max or a single step size fits no channel;
- a few massive channels on a large DC offset (the "massive activations" of large
  transformers): an offset the codec must not spend bits on;
- a few high-norm tokens (attention-sink/register-like), 20x the typical norm, which
  ruin min/max scaling of every channel they touch;
- step pairs: the next sampler step's hidden state correlated with this one at rho
  (0.9 and above between consecutive Euler steps), with the same structure in place.

`captured` adds activations from this project's FLUX.2 model (random weights) fed a
real photograph (scikit-image's bundled astronaut, patchified through a fixed random
projection standing in for the VAE), at consecutive steps of an Euler loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .base import TokenLayout


@dataclass(frozen=True)
class CorpusSpec:
    """One synthetic carry. Sizes in tokens/channels; scales relative to the median channel."""

    layout: TokenLayout = TokenLayout(512, 64, 64)  # FLUX.2 at 1024x1024
    channels: int = 768  # hidden size (FLUX.2 dev has 6144; 768 keeps CPU benches quick)
    corr_len: float = 3.0  # spatial correlation length, tokens
    smooth_fraction: float = 0.85  # share of an image token's variance that is spatially smooth
    scale_spread: float = 1.0  # std of log channel scale
    tail_df: float = 5.0  # Student-t degrees of freedom of the white part
    massive_channels: int = 4
    massive_offset: float = 60.0
    loud_tokens: int = 4
    loud_gain: float = 20.0


def _smooth_field(h: int, w: int, channels: int, corr_len: float, g: torch.Generator) -> torch.Tensor:
    """Unit-variance fields on an h x w grid, Gaussian-smoothed: (h*w, channels)."""
    noise = torch.randn(channels, 1, h, w, generator=g)
    radius = max(1, int(math.ceil(3 * corr_len)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / corr_len) ** 2)
    k = k / k.norm()  # keeps unit variance for white input
    field = torch.nn.functional.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, radius))
    field = torch.nn.functional.conv2d(field, k.view(1, 1, -1, 1), padding=(radius, 0))
    return field.reshape(channels, h * w).T.contiguous()


def _student_t(shape, df: float, g: torch.Generator) -> torch.Tensor:
    normal = torch.randn(*shape, generator=g)
    chi2 = torch._standard_gamma(torch.full(shape, df / 2), generator=g) * 2
    return normal / torch.sqrt(chi2 / df) * math.sqrt((df - 2) / df)  # unit variance


def _innovation(spec: CorpusSpec, g: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-scale activations before channel scales and structure: (tokens, C)."""
    lay, c = spec.layout, spec.channels
    a = math.sqrt(spec.smooth_fraction)
    image = a * _smooth_field(lay.h, lay.w, c, spec.corr_len, g) + math.sqrt(1 - a * a) * _student_t(
        (lay.h * lay.w, c), spec.tail_df, g)
    text = _student_t((lay.n_txt, c), spec.tail_df, g)
    return torch.cat([text, image])


@dataclass
class _Structure:
    scale: torch.Tensor  # (C,)
    offset: torch.Tensor  # (C,)
    loud: torch.Tensor  # token indices


def _structure(spec: CorpusSpec, g: torch.Generator) -> _Structure:
    c = spec.channels
    scale = torch.exp(spec.scale_spread * torch.randn(c, generator=g))
    offset = 0.3 * torch.randn(c, generator=g) * scale
    massive = torch.randperm(c, generator=g)[: spec.massive_channels]
    offset[massive] += spec.massive_offset * float(scale.median())
    loud = torch.randperm(spec.layout.tokens, generator=g)[: spec.loud_tokens]
    return _Structure(scale, offset, loud)


def _apply(z: torch.Tensor, s: _Structure, spec: CorpusSpec) -> torch.Tensor:
    x = z * s.scale + s.offset
    x[s.loud] *= spec.loud_gain
    return x


def synthetic_carry(spec: CorpusSpec = CorpusSpec(), seed: int = 0) -> torch.Tensor:
    """One carry: (1, tokens, channels) float32, text tokens first."""
    g = torch.Generator().manual_seed(seed)
    s = _structure(spec, g)
    return _apply(_innovation(spec, g), s, spec).unsqueeze(0)


def synthetic_steps(spec: CorpusSpec = CorpusSpec(), rho: float = 0.95, steps: int = 2,
                    seed: int = 0) -> list[torch.Tensor]:
    """Consecutive sampler steps: each step's innovation correlates with the last at `rho`."""
    g = torch.Generator().manual_seed(seed)
    s = _structure(spec, g)
    z = _innovation(spec, g)
    out = [_apply(z, s, spec).unsqueeze(0)]
    for _ in range(steps - 1):
        z = rho * z + math.sqrt(1 - rho * rho) * _innovation(spec, g)
        out.append(_apply(z, s, spec).unsqueeze(0))
    return out


def corpus(seed: int = 0, channels: int = 768) -> dict[str, object]:
    """The named corpus entries the codec benchmark reports on."""
    base = CorpusSpec(channels=channels)
    return {
        "dit-like": synthetic_carry(base, seed),
        "dit-like, no high-norm tokens": synthetic_carry(replace(base, loud_tokens=0), seed),
        "steps rho=0.95": synthetic_steps(base, 0.95, 2, seed),
        "steps rho=0.9": synthetic_steps(base, 0.9, 2, seed),
    }


def captured(config_name: str = "tiny", size: int = 32, n_txt: int = 64, steps: int = 4, block: int | None = None,
             seed: int = 0) -> list[torch.Tensor]:
    """Hidden states of this project's FLUX.2 (random weights) fed a real photograph.

    Needs scikit-image (its bundled astronaut photo). Returns the carry after `block`
    (default: the middle) at each of `steps` consecutive Euler steps.
    """
    from skimage.data import astronaut  # bundled with the package: no download

    from ..splitter.flux2.config import KNOWN_SIZES
    from ..splitter.flux2.random_weights import random_checkpoint
    from ..splitter.flux2.stage import Flux2Stage, image_ids, text_ids
    from ..splitter.plan import BlockRange
    from ..splitter.sampling import flow_sigmas

    config = KNOWN_SIZES[config_name]
    block = config.n_blocks // 2 if block is None else block
    g = torch.Generator().manual_seed(seed)
    img = torch.from_numpy(astronaut()).float().permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, 512, 512)
    img = torch.nn.functional.interpolate(img, size=(size * 8, size * 8), mode="area")
    patches = img.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(1, size * size, 192)
    projection = torch.randn(192, config.in_channels, generator=g) / math.sqrt(192)  # stand-in for the VAE
    latent = patches @ projection
    state = random_checkpoint(config, seed)
    stage = Flux2Stage(config, BlockRange(0, block), first=True, last=False,
                       load_weights=lambda keys: {k: state[k] for k in keys})
    txt = torch.randn(1, n_txt, config.context_dim, generator=g)
    noise = torch.randn(latent.shape, generator=g)
    out = []
    for sigma in flow_sigmas(steps, shift=3.0)[:steps]:
        x = (1 - sigma) * latent + sigma * noise  # the flow-matching interpolant at this step
        ctx = stage.context(sigma.expand(1), None, text_ids(1, n_txt), image_ids(1, size, size))
        out.append(stage.run_blocks(stage.embed(x, txt), ctx).float())
    return out
