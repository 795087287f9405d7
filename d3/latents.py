"""VAE latent maths: the size arithmetic between pixels and latents, and the scaled encode / decode.

The lowest layer of the model code: it imports only torch, so the backbone loader, the denoiser adapters, the
predictor and the training step can all use it without importing one another.
"""

from __future__ import annotations

import torch
from torch import nn


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent cell (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def unet_size_multiple(unet: nn.Module, vae: nn.Module) -> int:
    """Image sizes must be multiples of this so that every UNet level halves and doubles exactly (64 for SD)."""
    levels = len(getattr(unet.config, "block_out_channels", (0,))) - 1
    return vae_scale_factor(vae) * 2**levels


def encode_image(vae: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> scaled latent. The posterior *mean*: deterministic, unlike the official code's sample."""
    latent = vae.encode(rgb.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def decode_latent(vae: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> image, nominally in [-1, 1]. Differentiable: the task loss trains through it."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent = latent / vae.config.scaling_factor + shift
    return vae.decode(latent.to(vae.dtype)).sample
