"""Stratified expert timesteps: one uniform draw per bin, for every architecture.

The official UNet code draws N_T integer timesteps per image, one from each of N_T equal bins of [1, 999); the
flow-matching backbones use the same stratification on the σ axis. Both come from `stratified`, so the two cannot
drift apart.
"""

from __future__ import annotations

import torch


def stratified(batch_size: int, num_bins: int, low: float, high: float, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(B, num_bins) floats, x_k = low + (k + u)(high − low)/num_bins with u ~ U[0, 1) per entry."""
    u = torch.rand(batch_size, num_bins, generator=generator, device=generator.device if generator else None)
    k = torch.arange(num_bins, device=u.device, dtype=u.dtype)
    x = low + (k + u) * (high - low) / num_bins
    return x.to(device) if device is not None else x


def stratified_timesteps(
    batch_size: int,
    num_timesteps: int = 3,
    t_min: int = 1,
    t_max: int = 999,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, N_T) integer timesteps, t_k = ⌊t_min + (k+u)(t_max−t_min)/N_T⌋.

    With the defaults these are the official bins ≈ [1,333], [333,666], [666,998].
    """
    return torch.floor(stratified(batch_size, num_timesteps, t_min, t_max, generator, device)).long()
