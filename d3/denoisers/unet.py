"""The UNet adapter (Stable Diffusion 2.1)."""


from __future__ import annotations


from ..features import official_key_names, unet_layer_channels, unet_layer_set
from ..latents import unet_size_multiple, vae_scale_factor
from ..timesteps import stratified_timesteps
from .base import Denoiser


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
