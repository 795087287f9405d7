"""One adapter layer between the D³ machinery and the denoising network: a UNet or a diffusion transformer (DiT).

Everything else in d3 (the teacher pass, the student pass, the heads, the predictor) talks to a `Denoiser`, which
hides what differs between architectures:

=====================  ===================================  =========================================================
                       `UNetDenoiser` (SD 2.1)              `FluxDenoiser` (FLUX.1) / `SD3Denoiser` (SD 3.x)
=====================  ===================================  =========================================================
call                   UNet(z, t, encoder_hidden_states)    Flux: 2×2-packed tokens, img/txt ids, pooled CLIP, guidance;
                                                            SD3: latent image in, pooled CLIP
noise (teacher)        the DDPM scheduler's add_noise       flow matching x_t = (1 − σ)·x + σ·ε
expert timesteps       integer t, stratified over [1, 999]  σ stratified over [0.001, 0.999], given as t = 1000·σ
student timestep       261 (the official code)              420 = 1000·σ with σ matched to SD 2.1's SNR at t = 261
features               (N, C, H, W) block outputs           image tokens only, reshaped to the token grid
default layer set      ``up`` (official, 11 layers)         Flux: last 25 single-stream blocks (paper §6.1.2);
                                                            SD3: last half of the joint blocks
=====================  ===================================  =========================================================

Timesteps are on one 0–1000 scale for every architecture (1000·σ for flow matching, the scale Flux's and SD3's
pipelines use), so the projection heads' time embedding (t/999) and the `--student_timestep` flag mean the same
thing everywhere.

Why 420 for a DiT student: the official UNet student is told it sees SD 2.1's t = 261, where ᾱ = 0.656, i.e. the
signal-to-noise ratio √ᾱ/√(1−ᾱ) = 0.810/0.587. A flow-matching input (1 − σ)·x + σ·ε has the same ratio at
σ = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)) ≈ 0.420. It is learned from there (or fixed with `--freeze_timestep`).

The conditioning of a fixed prompt is a dict of tensors with a leading batch dimension of 1:
UNet ``{"encoder_hidden_states"}``; Flux ``{"encoder_hidden_states" (T5 sequence), "pooled_projections" (CLIP
pooled), "guidance"}``; SD3 ``{"encoder_hidden_states" (CLIP-L|CLIP-G ⊕ T5 sequence), "pooled_projections"}``.
A bare tensor is accepted as ``{"encoder_hidden_states": tensor}`` (what the UNet code always passed).

One module per adapter (`unet`, `flux`, `sd3`) on `base` (the interface) and `dit` (what the flow-matching
transformers share); this package holds the factory.
"""


from __future__ import annotations


import json
from pathlib import Path


from torch import nn


from .base import ARCHITECTURES, Condition, Denoiser
from .dit import DIT_STUDENT_TIMESTEP, SIGMA_RANGE, TokenGridCapture, _DiTDenoiser, _snr_matched_sigma
from .flux import FLUX_GUIDANCE, FLUX_LAST_SINGLE_BLOCKS, FluxDenoiser
from .sd3 import SD3Denoiser
from .unet import UNetDenoiser


__all__ = [
    "ARCHITECTURES", "DENOISERS", "DIT_STUDENT_TIMESTEP", "FLUX_GUIDANCE", "FLUX_LAST_SINGLE_BLOCKS", "SIGMA_RANGE",
    "Condition", "Denoiser", "FluxDenoiser", "SD3Denoiser", "TokenGridCapture", "UNetDenoiser", "_DiTDenoiser",
    "_snr_matched_sigma", "as_denoiser", "denoiser_class", "detect_architecture",
]


DENOISERS: dict[str, type[Denoiser]] = {"unet": UNetDenoiser, "flux": FluxDenoiser, "sd3": SD3Denoiser}


def denoiser_class(architecture: str) -> type[Denoiser]:
    if architecture not in DENOISERS:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    return DENOISERS[architecture]


def as_denoiser(model: nn.Module | Denoiser, scheduler=None) -> Denoiser:
    """The matching Denoiser for a diffusers model (a Denoiser is returned as it is, given a scheduler if it had none)."""
    if isinstance(model, Denoiser):
        if scheduler is not None and model.scheduler is None:
            model.scheduler = scheduler
        return model
    name = type(getattr(model, "_orig_mod", model)).__name__  # a torch.compile wrapper is called as it is
    for cls in DENOISERS.values():
        if name == cls.model_class_name:
            return cls(model, scheduler)
    raise TypeError(f"no Denoiser for a {name}; expected one of "
                    f"{[c.model_class_name for c in DENOISERS.values()]}")


def detect_architecture(folder: str | Path) -> str:
    """'unet' or the DiT in a diffusers folder (pipeline or d3 checkpoint), from transformer/config.json."""

    folder = Path(folder)
    config = folder / "transformer" / "config.json"
    if not config.exists():
        return "unet"
    try:
        name = json.loads(config.read_text()).get("_class_name", "")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: not valid JSON ({err})") from None
    for arch, cls in DENOISERS.items():
        if cls.model_class_name == name:
            return arch
    raise ValueError(f"{config}: unsupported transformer class {name!r}; expected "
                     f"{FluxDenoiser.model_class_name} or {SD3Denoiser.model_class_name}")
