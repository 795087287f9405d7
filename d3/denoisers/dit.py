"""What the flow-matching transformers (FLUX.1, SD3) share: noise, σ timesteps, the student's SNR-matched
timestep and token-grid features."""


from __future__ import annotations


import math


import torch
from torch import nn


from ..features import FeatureCapture
from ..timesteps import stratified
from .base import Denoiser


SIGMA_RANGE = (0.001, 0.999)  # expert noise levels for flow matching: the DDPM range [1, 999] / 1000


def _snr_matched_sigma(alpha_bar: float) -> float:
    """The flow-matching σ whose input (1−σ)x + σε has the signal-to-noise ratio of DDPM's √ᾱ x + √(1−ᾱ) ε."""
    return math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar))


# SD 2.1's ᾱ at t = 261 (scaled-linear betas 0.00085..0.012, 1000 steps) is 0.65567: σ ≈ 0.4202.
DIT_STUDENT_TIMESTEP = round(1000 * _snr_matched_sigma(0.65567))  # 420


class TokenGridCapture(FeatureCapture):
    """Captures the image tokens of transformer blocks and reshapes them to the token grid (N, C, h, w).

    Flux and SD3 blocks return ``(text tokens, image tokens)``; other modules return one token sequence, of which
    the last h·w tokens are the image (Flux's single-stream blocks put the text first).
    """

    def __init__(self, model: nn.Module, layers, denoiser: Denoiser):
        self._denoiser = denoiser
        super().__init__(model, layers)

    def _hook(self, name: str):
        def hook(module, args, output):
            self._store[name] = self._denoiser.tokens_to_grid(output, name)

        return hook


class _DiTDenoiser(Denoiser):
    """Flow-matching transformers: shared noise, timesteps and token-grid features."""

    def add_noise(self, latents, noise, timesteps):
        sigma = (timesteps.to(latents.dtype) / 1000).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - sigma) * latents + sigma * noise

    def sample_timesteps(self, batch_size, num_timesteps=3, generator=None, device=None):
        """σ_k = σ_min + (k + u)(σ_max − σ_min)/N_T, u ~ U[0, 1): the UNet's stratification, on the σ axis."""
        lo, hi = SIGMA_RANGE
        return 1000 * stratified(batch_size, num_timesteps, lo, hi, generator, device)

    def feature_capture(self, layers):
        return TokenGridCapture(self.model, layers, self)

    def tokens_to_grid(self, output, name: str) -> torch.Tensor:
        if self._state["grid"] is None:
            raise RuntimeError(f"{name}: features captured outside a {type(self).__name__} call (token grid unknown)")
        h, w = self._state["grid"]
        if isinstance(output, (tuple, list)):
            output = output[1] if len(output) == 2 and torch.is_tensor(output[1]) else output[0]
        if output.dim() != 3 or output.shape[1] < h * w:
            raise RuntimeError(f"{name}: expected image tokens (N, L≥{h * w}, C), got {tuple(output.shape)}")
        tokens = output[:, -h * w:]
        return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)
