"""Load the pretrained diffusion parts and move between images, prompts and latents.

One loader serves training (UNet, VAE, scheduler, text encoder + tokenizer from a hub id or a local diffusers
folder) and inference (a d3 checkpoint folder: UNet + VAE, no text encoder). The task prompt is embedded once at
start-up; afterwards the text encoder is released, which is why the rest of the code only sees `prompt_embeds`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-2-1"


class BackboneLoadError(RuntimeError):
    """A backbone could not be loaded; the message says what to pass instead."""


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    tokenizer: object | None = None
    text_encoder: torch.nn.Module | None = None
    source: str = ""

    def release_text_encoder(self) -> None:
        """Drop the text encoder once the fixed task prompt is embedded (it is never needed again)."""
        self.text_encoder = None
        self.tokenizer = None


def _load(component: str, loader, name_or_path: str, **kwargs):
    try:
        return loader(name_or_path, subfolder=component, **kwargs)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise BackboneLoadError(
                f"{name_or_path}: cannot load '{component}/' ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "expected a diffusers Stable Diffusion folder with unet/, vae/, scheduler/, text_encoder/, tokenizer/"
            ) from None
        raise BackboneLoadError(
            f"cannot load {component} of '{name_or_path}' from the Hugging Face Hub (no network or unknown id); "
            "pass a local diffusers folder with --pretrained_model_name_or_path /path/to/stable-diffusion-2-1"
        ) from None


def load_backbone(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    with_text_encoder: bool = True,
    revision: str | None = None,
    variant: str | None = None,
) -> Backbone:
    """Load UNet, VAE, noise scheduler and (optionally) text encoder + tokenizer, all in float32.

    Precision is the caller's choice afterwards (frozen parts are cast to bf16/fp16 by the trainer).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    name_or_path = str(name_or_path)
    looks_like_path = name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise BackboneLoadError(f"{name_or_path}: no such folder; expected a diffusers Stable Diffusion folder")
    kw = dict(revision=revision)
    unet = _load("unet", UNet2DConditionModel.from_pretrained, name_or_path, variant=variant, **kw)
    vae = _load("vae", AutoencoderKL.from_pretrained, name_or_path, variant=variant, **kw)
    scheduler = _load("scheduler", DDPMScheduler.from_pretrained, name_or_path, **kw)
    tokenizer = text_encoder = None
    if with_text_encoder:
        tokenizer = _load("tokenizer", CLIPTokenizer.from_pretrained, name_or_path, **kw)
        text_encoder = _load("text_encoder", CLIPTextModel.from_pretrained, name_or_path, variant=variant, **kw)
    return Backbone(unet, vae, scheduler, tokenizer, text_encoder, source=name_or_path)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
    """The conditioning sequence (1, L, D) of a fixed prompt, padded to the tokenizer's length as SD does."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float().cpu()


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def unet_size_multiple(unet: torch.nn.Module, vae: AutoencoderKL) -> int:
    """Image sizes must be multiples of this so that every UNet level halves and doubles exactly (64 for SD)."""
    levels = len(getattr(unet.config, "block_out_channels", (0,))) - 1
    return vae_scale_factor(vae) * 2**levels


def encode_image(vae: AutoencoderKL, rgb: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> scaled latent. The posterior *mean*: deterministic, unlike the official code's sample."""
    latent = vae.encode(rgb.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def decode_latent(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> image, nominally in [-1, 1]. Differentiable: the task loss trains through it."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent = latent / vae.config.scaling_factor + shift
    return vae.decode(latent.to(vae.dtype)).sample
