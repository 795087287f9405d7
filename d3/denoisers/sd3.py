"""The Stable Diffusion 3 / 3.5 adapter."""


from __future__ import annotations


import torch


from ..features import module_paths
from ..latents import vae_scale_factor
from .dit import DIT_STUDENT_TIMESTEP, _DiTDenoiser


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
