"""Timestep-conditioned projection heads P_k(r_k, t) that map the student's single clean representation into each
expert timestep's representation space (paper Eq. 2; CleanDIFT-style, PROTOCOLS §6.3). Training only.

Variants, for the projection-head ablation (paper Table 7):
- ``cleandift`` (default, the official code): Fourier features of t/999 -> a shared mapping network
  (RMSNorm, 2 SwiGLU FFN blocks, RMSNorm) -> per layer a stack of 3 residual SwiGLU FFN blocks, each
  pre-normalised by an AdaRMSNorm whose scale is 1 + Linear(c); all residual branches and scales start at zero,
  so every head starts as the identity.
- ``linear``: one token-wise linear map per layer, initialised to the identity, *not* conditioned on t
  (isolates the value of time conditioning).
- ``none``: no head; the student's features are compared with every expert directly ("No" row of Table 7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_TYPES = ("cleandift", "linear", "none")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In at least fp32: the mean of squares of bf16 activations loses too much.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class SwiGLU(nn.Module):
    """FFN with a gated SiLU: down(silu(gate) * value); biases off as in the official adapters."""

    def __init__(self, dim: int, hidden: int, zero_init_out: bool = False):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        if zero_init_out:
            nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of the normalised timestep: fixed Gaussian frequencies (a buffer, not trained)."""

    def __init__(self, dim: int = 256, max_timestep: float = 999.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g), persistent=True)
        self.max_timestep = max_timestep

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * (t.float() / self.max_timestep)[:, None] * self.freqs[None]
        return torch.cat([phase.cos(), phase.sin()], dim=-1)


class TimeMapping(nn.Module):
    """Fourier(t) -> Linear -> RMSNorm -> 2 residual SwiGLU blocks -> RMSNorm: the condition c shared by all heads."""

    def __init__(self, dim: int = 256, hidden: int = 768, depth: int = 2):
        super().__init__()
        self.fourier = FourierTimeEmbedding(dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm_in = RMSNorm(dim)
        self.blocks = nn.ModuleList(SwiGLU(dim, hidden // 2) for _ in range(depth))
        self.block_norms = nn.ModuleList(RMSNorm(dim) for _ in range(depth))
        self.norm_out = RMSNorm(dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c = self.norm_in(self.proj(self.fourier(t)))
        for norm, block in zip(self.block_norms, self.blocks):
            c = c + block(norm(c))
        return self.norm_out(c)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is 1 + Linear(c), zero-initialised (starts as a plain RMSNorm)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, affine=False)
        self.scale = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.scale.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.scale(c).to(x.dtype)  # (N, C)
        return self.norm(x) * scale[:, None, :]


class AdapterBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = AdaRMSNorm(dim, cond_dim)
        self.ffn = SwiGLU(dim, dim, zero_init_out=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x, c))


class TimestepAdapter(nn.Module):
    def __init__(self, dim: int, cond_dim: int, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(AdapterBlock(dim, cond_dim) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, c)
        return tokens


def _key(layer: str) -> str:
    # ModuleDict keys cannot contain dots.
    return layer.replace(".", "__")


class ProjectionHeads(nn.Module):
    """One head per aligned layer. `forward(features, t)` maps tokens (N, L, C_k) given expert timesteps t (N,)."""

    def __init__(self, channels: dict[str, int], head_type: str = "cleandift", cond_dim: int = 256, depth: int = 3):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {head_type!r}; expected one of {HEAD_TYPES}")
        self.head_type = head_type
        self.layers = list(channels)
        self.mapping = TimeMapping(cond_dim) if head_type == "cleandift" else None
        heads = {}
        for layer, dim in channels.items():
            if head_type == "cleandift":
                heads[_key(layer)] = TimestepAdapter(dim, cond_dim, depth)
            elif head_type == "linear":
                linear = nn.Linear(dim, dim, bias=True)
                nn.init.eye_(linear.weight)
                nn.init.zeros_(linear.bias)
                heads[_key(layer)] = linear
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.head_type == "none":
            return dict(features)
        c = self.mapping(t) if self.mapping is not None else None
        out = {}
        for layer, tokens in features.items():
            head = self.heads[_key(layer)]
            out[layer] = head(tokens, c) if c is not None else head(tokens)
        return out
