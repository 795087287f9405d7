"""Timestep-conditioned projection heads P_k(r_k, t) that map the student's single clean representation into each
expert timestep's representation space (paper Eq. 2; the CleanDIFT-style heads of the authors' code). Training only.

The default (``cleandift``) is parameter-identical to the authors' heads, module names included, so their released
`.pth` (heads and all) loads strictly with `--init_from`:

- ``time_emb``: Fourier features of t/999: a fixed Gaussian buffer ``weight`` (128, 1) → [cos 2πtW, sin 2πtW];
- ``time_in_proj``: a bias-free 256 → 256 linear;
- ``mapping``: RMSNorm → 2 residual feed-forward blocks (RMSNorm, SwiGLU up-projection 256 → 2·768, zero-initialised
  768 → 256 down-projection) → RMSNorm: the condition c shared by every head;
- ``adapters.<key>``: per aligned layer a stack of 3 residual feed-forward blocks of width C (hidden C), each
  pre-normalised by an AdaRMSNorm whose per-channel scale is 1 + Linear(c) (zero-initialised), down-projection
  zero-initialised. On a UNet's ``up`` layer set the keys are the authors' ``mid, us1, us2, ...``.

Every residual branch starts at zero, so a fresh adapter is the identity and a fresh mapping is RMSNorm(RMSNorm(x)).

Other variants, for the projection-head ablation (paper Table 7):
- ``linear``: one token-wise linear map per layer, initialised to the identity, *not* conditioned on t;
- ``none``: no head; the student's features are compared with every expert directly ("No" row of Table 7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .flags import HEAD_TYPES  # noqa: F401

TIME_WIDTH = 256  # width of the time condition c
MAPPING_HIDDEN = 768  # hidden width of the mapping's feed-forward blocks
MAPPING_DEPTH = 2
ADAPTER_DEPTH = 3
MAX_TIMESTEP = 999.0


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) · scale, with the mean of squares in at least fp32 (bf16 activations lose too much there)."""
    work = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    factor = scale.to(work) * torch.rsqrt(x.to(work).pow(2).mean(-1, keepdim=True) + eps)
    return x * factor.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is 1 + Linear(c), zero-initialised (starts as a plain RMSNorm)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.linear(c)[:, None, :] + 1, self.eps)


class FeedForward(nn.Module):
    """x + down(SwiGLU(up(norm(x)))): the up-projection's outputs are [value, gate]; the down-projection starts at
    zero, so the block starts as the identity. `cond_dim` makes the norm adaptive (an AdaRMSNorm)."""

    def __init__(self, dim: int, hidden: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = RMSNorm(dim) if cond_dim is None else AdaRMSNorm(dim, cond_dim)
        self.up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x) if c is None else self.norm(x, c)
        value, gate = self.up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(value * F.silu(gate))


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar: fixed Gaussian frequencies (a saved buffer, not trained)."""

    def __init__(self, dim: int = TIME_WIDTH, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(dim // 2, 1, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 1)
        phase = 2 * math.pi * x @ self.weight.to(x.dtype).T
        return torch.cat([phase.cos(), phase.sin()], dim=-1)


class MappingNetwork(nn.Module):
    def __init__(self, dim: int = TIME_WIDTH, hidden: int = MAPPING_HIDDEN, depth: int = MAPPING_DEPTH):
        super().__init__()
        self.in_norm = RMSNorm(dim)
        self.blocks = nn.ModuleList(FeedForward(dim, hidden) for _ in range(depth))
        self.out_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class AdapterStack(nn.Module):
    """The head of one layer: `depth` time-conditioned residual feed-forward blocks at the layer's width."""

    def __init__(self, dim: int, cond_dim: int = TIME_WIDTH, depth: int = ADAPTER_DEPTH):
        super().__init__()
        self.layers = nn.ModuleList(FeedForward(dim, dim, cond_dim) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens, c)
        return tokens


def _module_key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot contain dots


class ProjectionHeads(nn.Module):
    """One head per aligned layer. `forward(features, t)` maps tokens (N, L, C_k) given expert timesteps t (N,).

    `names` maps a layer to its key under ``adapters`` (the authors' ``mid, us1, ...``); by default the layer's
    module path with dots replaced by ``__``.
    """

    def __init__(self, channels: dict[str, int], head_type: str = "cleandift", names: dict[str, str] | None = None):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {head_type!r}; expected one of {HEAD_TYPES}")
        self.head_type = head_type
        self.layers = list(channels)
        self.keys = {layer: (names or {}).get(layer, _module_key(layer)) for layer in self.layers}
        if len(set(self.keys.values())) != len(self.keys):
            raise ValueError(f"two layers share a head name: {self.keys}")
        if head_type == "cleandift":
            self.time_emb = FourierFeatures(TIME_WIDTH)
            self.time_in_proj = nn.Linear(TIME_WIDTH, TIME_WIDTH, bias=False)
            self.mapping = MappingNetwork()
        adapters = {}
        for layer, dim in channels.items():
            if head_type == "cleandift":
                adapters[self.keys[layer]] = AdapterStack(dim)
            elif head_type == "linear":
                linear = nn.Linear(dim, dim, bias=True)
                nn.init.eye_(linear.weight)
                nn.init.zeros_(linear.bias)
                adapters[self.keys[layer]] = linear
        self.adapters = nn.ModuleDict(adapters)
        # `d3.objective.alignment_loss` recomputes each layer's head and cosine in the backward pass when this is on
        # (`--gradient_checkpointing`); the heads' own forward is unchanged.
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def condition(self, t: torch.Tensor) -> torch.Tensor:
        """The time condition c (N, 256) of expert timesteps t (N,) on the 0-999 scale."""
        x = (t.to(self.time_in_proj.weight.dtype) / MAX_TIMESTEP)[:, None]
        return self.mapping(self.time_in_proj(self.time_emb(x)))

    def time_condition(self, t: torch.Tensor) -> torch.Tensor | None:
        """What `project` needs besides the tokens: c for ``cleandift``, None for the unconditioned variants."""
        return self.condition(t) if self.head_type == "cleandift" else None

    def project(self, layer: str, tokens: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """One layer's head on tokens (N, L, C) given `time_condition(t)`."""
        if self.head_type == "none":
            return tokens
        head = self.adapters[self.keys[layer]]
        return head(tokens, c) if c is not None else head(tokens)

    def forward(self, features: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.head_type == "none":
            return dict(features)
        c = self.time_condition(t)
        return {layer: self.project(layer, tokens, c) for layer, tokens in features.items()}
