"""Load the pretrained diffusion parts and move between images, prompts and latents.

One loader serves training (UNet, VAE, scheduler, text encoder + tokenizer from a hub id or a local diffusers
folder) and inference (a d3 checkpoint folder: UNet + VAE, no text encoder). The task prompt is embedded once at
start-up; afterwards the text encoder is released, which is why the rest of the code only sees `prompt_embeds`.

A folder with `transformer/` is a diffusion transformer (FLUX.1 or SD3, `d3.denoisers`): its transformer, 16-channel
VAE, flow-matching scheduler and its text encoders (Flux: CLIP + T5; SD3: CLIP-L + CLIP-G + T5) load instead, and
`encode_condition` gives the dict of tensors that model is conditioned on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .denoisers import DENOISERS, FLUX_GUIDANCE, as_denoiser, denoiser_class, detect_architecture
from .flags import DEFAULT_BASE_MODEL, withdrawn_hint  # noqa: F401
from .hub import OFFLINE_HINT, offline_reason, quiet_hub_calls


class BackboneLoadError(RuntimeError):
    """A backbone could not be loaded; the message says what to pass instead."""


@dataclass
class Backbone:
    unet: UNet2DConditionModel | None  # None for a DiT backbone (see `transformer`)
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    tokenizer: object | None = None
    text_encoder: torch.nn.Module | None = None
    source: str = ""
    architecture: str = "unet"  # "unet" | "flux" | "sd3"
    transformer: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    text_encoder_3: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The denoising network, whichever architecture."""
        return self.unet if self.architecture == "unet" else self.transformer

    def denoiser(self):
        """The `d3.denoisers.Denoiser` of the denoising network, with this backbone's scheduler."""
        return as_denoiser(self.model, self.scheduler)

    def release_text_encoder(self) -> None:
        """Drop the text encoders once the fixed task prompt is embedded (they are never needed again)."""
        self.text_encoder = self.tokenizer = None
        self.text_encoder_2 = self.tokenizer_2 = None
        self.text_encoder_3 = self.tokenizer_3 = None


def _load(component: str, loader, name_or_path: str, **kwargs):
    """`loader(name_or_path, subfolder=component)`; a hub id is read from the local cache only when the Hub cannot be
    asked (`d3.hub.offline_reason`), so an unreachable Hub fails at once instead of after minutes of retries."""
    is_dir = Path(name_or_path).expanduser().is_dir()
    offline = None if is_dir else offline_reason()
    if offline is not None:
        kwargs["local_files_only"] = True
    try:
        with quiet_hub_calls():
            return loader(name_or_path, subfolder=component, **kwargs)
    except (OSError, ValueError) as err:
        if is_dir:
            raise BackboneLoadError(
                f"{name_or_path}: cannot load '{component}/' ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "expected a diffusers Stable Diffusion folder with unet/, vae/, scheduler/, text_encoder/, tokenizer/"
            ) from None
        withdrawn = withdrawn_hint(name_or_path)
        if offline is not None:
            raise BackboneLoadError(
                f"'{name_or_path}' ({component}/) is not in the local Hugging Face cache and {offline}: "
                + (f"{withdrawn}; or {OFFLINE_HINT}" if withdrawn else
                   "pass a local diffusers folder with --pretrained_model_name_or_path /path/to/stable-diffusion-2-1, "
                   f"or {OFFLINE_HINT}")
            ) from None
        if withdrawn:
            raise BackboneLoadError(f"cannot load {component}/: {withdrawn}") from None
        raise BackboneLoadError(
            f"cannot load {component} of '{name_or_path}' from the Hugging Face Hub (unknown id, gated model or no "
            f"access: {type(err).__name__}); pass a local diffusers folder with --pretrained_model_name_or_path "
            "/path/to/stable-diffusion-2-1 (a gated model such as black-forest-labs/FLUX.1-dev needs its licence "
            "accepted on its Hub page and a token: `hf auth login` or HF_TOKEN)"
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
    A folder (or hub id) with `transformer/` loads as a DiT backbone (`_load_dit`).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    name_or_path = str(name_or_path)
    looks_like_path = name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise BackboneLoadError(f"{name_or_path}: no such folder; expected a diffusers Stable Diffusion folder")
    architecture = _architecture(name_or_path, revision)
    if architecture != "unet":
        return _load_dit(architecture, name_or_path, with_text_encoder, revision, variant)
    kw = dict(revision=revision)
    unet = _load("unet", UNet2DConditionModel.from_pretrained, name_or_path, variant=variant, **kw)
    vae = _load("vae", AutoencoderKL.from_pretrained, name_or_path, variant=variant, **kw)
    scheduler = _load("scheduler", DDPMScheduler.from_pretrained, name_or_path, **kw)
    tokenizer = text_encoder = None
    if with_text_encoder:
        tokenizer = _load("tokenizer", CLIPTokenizer.from_pretrained, name_or_path, **kw)
        text_encoder = _load("text_encoder", CLIPTextModel.from_pretrained, name_or_path, variant=variant, **kw)
    return Backbone(unet, vae, scheduler, tokenizer, text_encoder, source=name_or_path)


def _architecture(name_or_path: str, revision: str | None) -> str:
    """'unet', 'flux' or 'sd3': from transformer/config.json of a local folder, or the hub's model_index.json."""
    if Path(name_or_path).expanduser().is_dir():
        try:
            return detect_architecture(Path(name_or_path).expanduser())
        except ValueError as err:
            raise BackboneLoadError(str(err)) from None
    try:  # a hub id: one small file tells the architecture; if it cannot be had, the UNet path reports the error

        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(name_or_path, "model_index.json", revision=revision,
                                                local_files_only=offline_reason() is not None)).read_text())
    except Exception:
        return "unet"
    name = (index.get("transformer") or [None, None])[-1]
    return next((arch for arch, cls in DENOISERS.items() if cls.model_class_name == name), "unet")


def _load_dit(architecture: str, name_or_path: str, with_text_encoder: bool, revision, variant) -> Backbone:
    """FLUX.1 (CLIP + T5 text encoders) or SD3 (CLIP-L + CLIP-G + T5), their VAE and flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    kw = dict(revision=revision)
    model_class = denoiser_class(architecture).model_class()
    transformer = _load("transformer", model_class.from_pretrained, name_or_path, variant=variant, **kw)
    vae = _load("vae", AutoencoderKL.from_pretrained, name_or_path, variant=variant, **kw)
    scheduler = _load("scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained, name_or_path, **kw)
    backbone = Backbone(None, vae, scheduler, source=name_or_path, architecture=architecture, transformer=transformer)
    if with_text_encoder:
        clip = CLIPTextModel if architecture == "flux" else CLIPTextModelWithProjection
        encoders = [("", clip), ("_2", T5EncoderModel if architecture == "flux" else CLIPTextModelWithProjection)]
        if architecture == "sd3":
            encoders.append(("_3", T5EncoderModel))
        for suffix, cls in encoders:
            setattr(backbone, f"tokenizer{suffix}",
                    _load(f"tokenizer{suffix}", AutoTokenizer.from_pretrained, name_or_path, **kw))
            setattr(backbone, f"text_encoder{suffix}",
                    _load(f"text_encoder{suffix}", cls.from_pretrained, name_or_path, variant=variant, **kw))
    return backbone


@torch.no_grad()
def _t5_sequence(tokenizer, encoder: torch.nn.Module, prompt: str, max_length: int = 512) -> torch.Tensor:
    """T5 hidden states (1, L, D), padded to min(the tokenizer's length, 512) as the Flux and SD3 pipelines do."""
    length = min(tokenizer.model_max_length, max_length)
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids.to(next(encoder.parameters()).device))[0].float().cpu()


@torch.no_grad()
def _clip_outputs(tokenizer, encoder: torch.nn.Module, prompt: str):
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)


def encode_condition(backbone: Backbone, prompt: str) -> dict[str, torch.Tensor]:
    """The fixed prompt's conditioning, as the model's forward takes it (batch dimension 1, float32, on the CPU).

    UNet: {"encoder_hidden_states"}. Flux: T5 sequence, CLIP pooled output, the guidance value (FLUX.1-dev).
    SD3: [CLIP-L | CLIP-G penultimate states, zero-padded to T5's width] followed by the T5 sequence, and the two
    CLIP projections concatenated as the pooled input.
    """
    if backbone.text_encoder is None:
        raise ValueError(f"{backbone.source}: the text encoders were not loaded (or already released)")
    if backbone.architecture == "unet":
        return {"encoder_hidden_states": encode_prompt(backbone.tokenizer, backbone.text_encoder, prompt)}
    if backbone.architecture == "flux":
        pooled = _clip_outputs(backbone.tokenizer, backbone.text_encoder, prompt).pooler_output.float().cpu()
        cond = {"encoder_hidden_states": _t5_sequence(backbone.tokenizer_2, backbone.text_encoder_2, prompt),
                "pooled_projections": pooled}
        if backbone.transformer.config.guidance_embeds:
            cond["guidance"] = torch.tensor([FLUX_GUIDANCE])
        return cond
    clip_l = _clip_outputs(backbone.tokenizer, backbone.text_encoder, prompt)
    clip_g = _clip_outputs(backbone.tokenizer_2, backbone.text_encoder_2, prompt)
    t5 = _t5_sequence(backbone.tokenizer_3, backbone.text_encoder_3, prompt)
    clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1).float().cpu()
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1).float().cpu()
    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": pooled}


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
    """The conditioning sequence (1, L, D) of a fixed prompt, padded to the tokenizer's length as SD does."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].float().cpu()
