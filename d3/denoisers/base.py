"""The `Denoiser` interface every architecture's adapter implements (see the package's docstring)."""


from __future__ import annotations


import copy
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path


import torch
from torch import nn


from ..features import FeatureCapture
from ..latents import vae_scale_factor


Condition = Mapping[str, torch.Tensor]

ARCHITECTURES = ("unet", "flux", "sd3")


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
