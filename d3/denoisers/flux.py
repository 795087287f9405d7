"""The FLUX.1 adapter."""


from __future__ import annotations


import torch


from ..features import module_paths
from ..latents import vae_scale_factor
from .dit import DIT_STUDENT_TIMESTEP, _DiTDenoiser


FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance for FLUX.1-dev; fixed into the checkpoint's conditioning
FLUX_LAST_SINGLE_BLOCKS = 25  # paper appendix 6.1.2: the last 25 single-stream blocks are aligned


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
