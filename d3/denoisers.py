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
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .features import FeatureCapture, module_paths, official_key_names, unet_layer_channels, unet_layer_set
from .latents import unet_size_multiple, vae_scale_factor
from .timesteps import stratified, stratified_timesteps

Condition = Mapping[str, torch.Tensor]

ARCHITECTURES = ("unet", "flux", "sd3")
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance for FLUX.1-dev; fixed into the checkpoint's conditioning
FLUX_LAST_SINGLE_BLOCKS = 25  # paper appendix 6.1.2: the last 25 single-stream blocks are aligned
SIGMA_RANGE = (0.001, 0.999)  # expert noise levels for flow matching: the DDPM range [1, 999] / 1000


def _snr_matched_sigma(alpha_bar: float) -> float:
    """The flow-matching σ whose input (1−σ)x + σε has the signal-to-noise ratio of DDPM's √ᾱ x + √(1−ᾱ) ε."""
    return math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar))


# SD 2.1's ᾱ at t = 261 (scaled-linear betas 0.00085..0.012, 1000 steps) is 0.65567: σ ≈ 0.4202.
DIT_STUDENT_TIMESTEP = round(1000 * _snr_matched_sigma(0.65567))  # 420


class Denoiser:
    """The interface: wraps one diffusers model (not an nn.Module itself, so parameter names stay the model's).

    Subclasses set `architecture`, `subfolder` (the model's folder in a diffusers pipeline and in a d3 checkpoint),
    `model_class_name`, `default_layer_set`, `default_student_timestep` and implement the hooks below.
    """

    architecture = ""
    subfolder = ""
    model_class_name = ""
    default_layer_set = ""
    default_student_timestep = 0.0
    condition_keys: tuple[str, ...] = ("encoder_hidden_states",)
    lora_targets: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, scheduler=None):
        self.model = model
        self.scheduler = scheduler
        self.adapters_off = False
        # The token grid of the model's latest call (DiT feature reshaping), kept on the model itself: every
        # Denoiser wrapping it (student, adapter-free teacher view, predictor) serves the same hooks.
        self._state: dict = model.__dict__.setdefault("_d3_state", {"grid": None})

    def without_adapters(self) -> Denoiser:
        """The same network with its LoRA adapters switched off during each call: the frozen pretrained model.

        With a LoRA student the teacher needs no copy of its own (for FLUX.1-dev that saves 24 GB of bf16
        weights): the student's frozen base weights are exactly the pretrained ones.
        """
        view = copy.copy(self)
        view.adapters_off = True
        return view

    @contextmanager
    def _adapters_disabled(self):
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    # -- the model ------------------------------------------------------------------------------------------
    @classmethod
    def model_class(cls):
        import diffusers

        return getattr(diffusers, cls.model_class_name)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the model denoises (what `add_noise` and the decoder see)."""
        return self.config.in_channels

    def size_multiple(self, vae) -> int:
        """Image sizes must be multiples of this (VAE downsampling × the model's own)."""
        return vae_scale_factor(vae)

    def bucket_multiple(self, vae) -> int:
        """What a compiled model pads to instead: a coarser grid of input sizes means fewer graphs to compile."""
        return self.size_multiple(vae)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        self.model.save_pretrained(path, safe_serialization=True, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, scheduler=None, **kwargs) -> Denoiser:
        return cls(cls.model_class().from_pretrained(path, **kwargs), scheduler)

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    # -- conditioning ---------------------------------------------------------------------------------------
    def condition(self, cond: Condition | torch.Tensor, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The fixed prompt's conditioning broadcast to the batch and cast to the activations' dtype."""
        if torch.is_tensor(cond):
            cond = {"encoder_hidden_states": cond}
        missing = [k for k in self.condition_keys if k not in cond]
        if missing:
            raise ValueError(f"{self.architecture} conditioning lacks {missing}; expected keys {self.condition_keys} "
                             f"(got {sorted(cond)})")
        out = {}
        for key, value in cond.items():
            value = value.to(dtype) if value.is_floating_point() else value
            out[key] = value.expand(batch_size, *value.shape[1:]) if value.shape[0] == 1 else value
        return out

    def _timesteps(self, timestep: torch.Tensor | float, batch_size: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        t = t.reshape(-1)
        return t.expand(batch_size) if t.numel() == 1 else t

    # -- the forward pass -----------------------------------------------------------------------------------
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Condition | torch.Tensor
                 ) -> torch.Tensor:
        """Latent (B, C, H, W) at timestep t (0–1000 scale) under the conditioning -> output latent (B, C, H, W)."""
        if self.adapters_off:
            with self._adapters_disabled():
                return self.forward(latents, timestep, cond)
        return self.forward(latents, timestep, cond)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Condition | torch.Tensor
                ) -> torch.Tensor:
        raise NotImplementedError

    # -- the teacher's noise --------------------------------------------------------------------------------
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, num_timesteps: int = 3, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """(B, N_T) expert timesteps, one per stratified bin."""
        raise NotImplementedError

    # -- features -------------------------------------------------------------------------------------------
    def layer_set(self, name: str | None = None) -> list[str]:
        raise NotImplementedError

    def head_names(self, layers: list[str]) -> dict[str, str] | None:
        """Names of the projection heads under ``adapters`` (None: the module paths)."""
        return None

    def feature_capture(self, layers: list[str]) -> FeatureCapture:
        """Hooks whose `pop()` gives {layer: (N, C, H, W)} for this architecture."""
        return FeatureCapture(self.model, layers)

    def feature_channels(self, layers: list[str], size: int | None = None) -> dict[str, int]:
        """Channels of each hooked layer, from one forward pass of a meta-device copy (no compute, no memory)."""
        meta = torch.device("meta")
        with meta:
            clone = type(self.model).from_config(self.model.config)
        probe = type(self)(clone)
        size = size or self._probe_size()
        latents = torch.empty(1, self.latent_channels, size, size, device=meta)
        capture = probe.feature_capture(layers)
        try:
            with torch.no_grad():
                probe(latents, torch.ones(1, device=meta), self._probe_condition(meta))
            return {name: feat.shape[1] for name, feat in capture.pop().items()}
        finally:
            capture.remove()

    def _probe_size(self) -> int:
        return 8

    def _probe_condition(self, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ================================================================================================ UNet (SD 2.1)
class UNetDenoiser(Denoiser):
    """A diffusers UNet2DConditionModel with its DDPM scheduler: exactly the calls the UNet code always made."""

    architecture = "unet"
    subfolder = "unet"
    model_class_name = "UNet2DConditionModel"
    default_layer_set = "up"
    default_student_timestep = 261.0  # the official code's initial value
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

    def size_multiple(self, vae) -> int:
        """The VAE's factor (8 for SD) only: diffusers' UNet takes latents whose size is not a multiple of its own
        2^levels (each up block upsamples to its skip connection's size), so padding further would only add pixels
        (at 192 px a 4:3 photo went 192×144 -> 192×192, 1.33× the work). `unet_size_multiple` (64 for SD) is what a
        pad-free pass through every level would need."""
        return vae_scale_factor(vae)

    def bucket_multiple(self, vae) -> int:
        """64 for SD: every UNet level then halves and doubles exactly, and a 768-px long side leaves 12 short-side
        sizes to compile instead of 96."""
        return unet_size_multiple(self.model, vae)

    def forward(self, latents, timestep, cond):
        cond = self.condition(cond, latents.shape[0], latents.dtype)
        return self.model(latents, timestep, return_dict=False, **cond)[0]

    def add_noise(self, latents, noise, timesteps):
        if self.scheduler is None:
            raise ValueError("UNetDenoiser.add_noise needs the backbone's DDPM scheduler (pass scheduler=...)")
        return self.scheduler.add_noise(latents, noise, timesteps)

    def sample_timesteps(self, batch_size, num_timesteps=3, generator=None, device=None):
        return stratified_timesteps(batch_size, num_timesteps, generator=generator, device=device)

    def layer_set(self, name=None):
        return unet_layer_set(self.model, name or self.default_layer_set)

    def head_names(self, layers):
        """The authors' ``mid, us1, us2, ...`` for the ``up`` set, so heads load from and save to their layout."""
        if list(layers) != unet_layer_set(self.model, "up"):
            return None
        return dict(zip(layers, official_key_names(layers)))

    def feature_channels(self, layers, size=None):
        return unet_layer_channels(self.model, layers)


# ======================================================================================================= DiTs
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


class FluxDenoiser(_DiTDenoiser):
    """FLUX.1 (FluxTransformer2DModel): 16-channel latents packed 2×2 into 64-channel tokens."""

    architecture = "flux"
    subfolder = "transformer"
    model_class_name = "FluxTransformer2DModel"
    default_layer_set = "single"
    default_student_timestep = float(DIT_STUDENT_TIMESTEP)
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp", "proj_out")
    LAYER_SETS = ("single", "single:N", "double", "all")

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels // 4

    def size_multiple(self, vae) -> int:
        return 2 * vae_scale_factor(vae)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2×2 patch one token, row-major over the patch grid."""
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), 4 * c)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of `pack`: (B, H/2·W/2, 4C) -> (B, C, H, W)."""
        b, _, d = tokens.shape
        x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, height, width)

    @staticmethod
    def image_ids(h: int, w: int, device) -> torch.Tensor:
        """(h·w, 3) positions (0, row, col) of the packed tokens: Flux's rotary embedding of the image."""
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        return ids.reshape(h * w, 3)

    def condition(self, cond, batch_size, dtype):
        out = super().condition(cond, batch_size, dtype)
        if self.config.guidance_embeds and "guidance" not in out:
            out["guidance"] = torch.full((batch_size,), FLUX_GUIDANCE, dtype=dtype, device=out["pooled_projections"].device)
        if not self.config.guidance_embeds:
            out.pop("guidance", None)
        return out

    def forward(self, latents, timestep, cond):
        b, _, height, width = latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"Flux latents must have even height and width, got {height}x{width}")
        h, w = height // 2, width // 2
        self._state["grid"] = (h, w)
        cond = self.condition(cond, b, latents.dtype)
        text = cond["encoder_hidden_states"]
        t = self._timesteps(timestep, b, latents.device)
        out = self.model(
            hidden_states=self.pack(latents),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            timestep=t / 1000,  # Flux takes σ and multiplies by 1000 itself
            img_ids=self.image_ids(h, w, latents.device),
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device),
            guidance=cond.get("guidance"),
            return_dict=False,
        )[0]
        return self.unpack(out, height, width)

    def layer_set(self, name=None):
        name = name or self.default_layer_set
        n_single = len(self.model.single_transformer_blocks)
        single = [f"single_transformer_blocks.{i}" for i in range(n_single)]
        double = [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
        if name == "single":
            return single[-FLUX_LAST_SINGLE_BLOCKS:]
        if name.startswith("single:") and name[7:].isdigit() and int(name[7:]) > 0:
            return single[-int(name[7:]):]
        if name == "double":
            return double
        if name == "all":
            return double + single
        return module_paths(self.model, name, self.LAYER_SETS)

    def feature_channels(self, layers, size=None):
        blocks = {f"single_transformer_blocks.{i}" for i in range(len(self.model.single_transformer_blocks))}
        blocks |= {f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))}
        if all(layer in blocks for layer in layers):
            return {layer: self.model.inner_dim for layer in layers}
        return super().feature_channels(layers, size)

    def _probe_condition(self, device):
        c = self.config
        return {"encoder_hidden_states": torch.empty(1, 4, c.joint_attention_dim, device=device),
                "pooled_projections": torch.empty(1, c.pooled_projection_dim, device=device)}


class SD3Denoiser(_DiTDenoiser):
    """Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): latents in, patchified inside the model."""

    architecture = "sd3"
    subfolder = "transformer"
    model_class_name = "SD3Transformer2DModel"
    default_layer_set = "blocks"
    default_student_timestep = float(DIT_STUDENT_TIMESTEP)
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    LAYER_SETS = ("blocks", "blocks:N", "all")

    def size_multiple(self, vae) -> int:
        return self.config.patch_size * vae_scale_factor(vae)

    def forward(self, latents, timestep, cond):
        b, _, height, width = latents.shape
        p = self.config.patch_size
        self._state["grid"] = (height // p, width // p)
        cond = self.condition(cond, b, latents.dtype)
        t = self._timesteps(timestep, b, latents.device)
        return self.model(hidden_states=latents, encoder_hidden_states=cond["encoder_hidden_states"],
                          pooled_projections=cond["pooled_projections"], timestep=t, return_dict=False)[0]

    def layer_set(self, name=None):
        name = name or self.default_layer_set
        blocks = [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
        if name == "blocks":
            return blocks[len(blocks) // 2:]
        if name.startswith("blocks:") and name[7:].isdigit() and int(name[7:]) > 0:
            return blocks[-int(name[7:]):]
        if name == "all":
            return blocks
        return module_paths(self.model, name, self.LAYER_SETS)

    def feature_channels(self, layers, size=None):
        blocks = {f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))}
        if all(layer in blocks for layer in layers):
            return {layer: self.model.inner_dim for layer in layers}
        return super().feature_channels(layers, size)

    def _probe_size(self) -> int:
        return 2 * self.config.patch_size

    def _probe_condition(self, device):
        c = self.config
        return {"encoder_hidden_states": torch.empty(1, 4, c.joint_attention_dim, device=device),
                "pooled_projections": torch.empty(1, c.pooled_projection_dim, device=device)}


# =================================================================================================== factory
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
