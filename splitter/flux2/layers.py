"""FLUX.2 building blocks in plain torch, with BFL/ComfyUI parameter names.

Module and parameter names match the checkpoint keys (`img_attn.qkv.weight`,
`norm.query_norm.scale`, `img_mlp.0.weight`, ...), so a block's `state_dict` *is* its
slice of the checkpoint and LoRA patches keyed by those names apply unchanged.
FLUX.2 has no biases in its linear layers and modulates every block from three shared
("global") modulation layers instead of one per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of a (B,) float tensor: [cos, sin] halves, as BFL's code.

    FLUX.2 is trained with t in [0, 1] (the flow-matching sigma) scaled by 1000.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis: (..., n) -> (..., n, dim/2, 2, 2).

    Frequencies are computed in float64 and the result kept in float32, as the reference
    implementations do: both halves of a split must build bit-identical tables.
    """
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """RoPE table for position ids (B, L, n_axes) -> (B, 1, L, head_dim/2, 2, 2)."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (B, H, L, D) by the table pe."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE: (B, H, L, D) x3 -> (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    """RMS norm with a learned `scale` (the checkpoint's name for it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale.float(), self.eps).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class MLPEmbedder(nn.Module):
    """Two linears with SiLU between: embeds the timestep (and guidance) signal."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """Shared modulation: vec -> (shift, scale, gate) once (single) or twice (double)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*out[i:i + 3]) for i in range(0, self.multiplier, 3)]


class SwiGLU(nn.Module):
    """silu(gate) * value, gate first: the split FLUX.2's `img_mlp.0` output is laid out in."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


def swiglu_mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    # Indices 0 and 2 are the checkpoint's `*_mlp.0` and `*_mlp.2`.
    return nn.Sequential(nn.Linear(hidden, 2 * mlp_hidden, bias=False), SwiGLU(), nn.Linear(mlp_hidden, hidden, bias=False))


class SelfAttention(nn.Module):
    """Holds the projections of one stream; the attention itself is joint (see blocks)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text first)."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.img_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_mlp = swiglu_mlp(hidden, mlp_hidden)
        self.txt_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = swiglu_mlp(hidden, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, img_mod: list[ModulationOut], txt_mod: list[ModulationOut],
                pe: Tensor) -> tuple[Tensor, Tensor]:
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_mod[0]))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_mod[0]))
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_mod[0].gate * self.img_attn.proj(img_attn)
        img = img + img_mod[1].gate * self.img_mlp(modulate(self.img_norm2(img), img_mod[1]))
        txt = txt + txt_mod[0].gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod[1].gate * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod[1]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; image] tokens; attention and MLP share linear1/linear2."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * mlp_hidden, bias=False)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden, bias=False)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, mod: ModulationOut, pe: Tensor) -> Tensor:
        B, L, _ = x.shape
        qkv, mlp = torch.split(self.linear1(modulate(self.pre_norm(x), mod)), [3 * self.hidden, 2 * self.mlp_hidden], -1)
        q, k, v = qkv.view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    """Final norm with its own adaLN modulation (shift, scale), then projection to latents."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))
