"""Self-supervised diffusion-prior aggregation (paper §3.2.1, Eq. 2): the D³ objective.

Per batch of B images and N_T expert timesteps:
- the frozen teacher ("visual experts") sees the B·N_T noisy latents x_t = add_noise(z, ε, t) in ONE no-grad pass;
- the student sees the clean latent z once per image at its own (learned or fixed) timestep. Its input does not
  depend on t, so its features are computed once and broadcast over the N_T timesteps; the official code runs the
  student (and the VAE decoder) on N_T identical copies, which gives the same losses and gradients at N_T times the
  cost (`d3/reference_step.py` keeps that batching and the tests hold the two equal);
- the projection heads map the student's features into each expert timestep's space and
  L_agg = Σ_k (1 − mean cosine similarity over batch, timesteps and tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .denoisers import Denoiser, as_denoiser
from .features import FeatureCapture
from .heads import ProjectionHeads

OFFICIAL_STUDENT_TIMESTEP = 261.0


def tokens(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H·W, C): heads and the cosine act per token over channels."""
    return feature.flatten(2).transpose(1, 2)


@torch.no_grad()
def expert_features(
    teacher: nn.Module | Denoiser,
    capture: FeatureCapture,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor | dict[str, torch.Tensor],
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Teacher features of the B·N_T noisy latents, in one batched forward. Ordered image-major (b·N_T + k).

    `teacher` is a diffusers model or its `Denoiser` (which owns the noise: DDPM through `scheduler` for a UNet,
    flow matching for a DiT); for a DiT, `capture` must come from that Denoiser's `feature_capture`.
    """
    teacher = as_denoiser(teacher, scheduler)
    n = timesteps.shape[1]
    t = timesteps.reshape(-1)
    clean = latents.repeat_interleave(n, dim=0)
    work = torch.promote_types(latents.dtype, torch.float32)  # add noise in ≥ fp32, then cast to the teacher's dtype
    noisy = teacher.add_noise(clean.to(work), noise.reshape(clean.shape).to(work), t)
    teacher(noisy.to(teacher.dtype), t, prompt_embeds)
    return capture.pop()


def alignment_loss(
    heads: ProjectionHeads,
    student_features: dict[str, torch.Tensor],
    expert: dict[str, torch.Tensor],
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_agg and its per-layer terms. Student features (B, C, H, W) are broadcast over the N_T timesteps."""
    b, n = timesteps.shape
    t = timesteps.reshape(-1)
    student_tokens = {}
    for layer, feat in student_features.items():
        tok = tokens(feat)
        student_tokens[layer] = tok.unsqueeze(1).expand(b, n, *tok.shape[1:]).reshape(b * n, *tok.shape[1:])
    projected = heads(student_tokens, t)
    per_layer = {}
    for layer, pred in projected.items():
        target = tokens(expert[layer]).to(pred.dtype)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        per_layer[layer] = 1.0 - cos.mean()
    total = torch.stack(list(per_layer.values())).sum()
    return total, per_layer


@dataclass
class AlignmentOutput:
    prediction: torch.Tensor  # the student's output latent (B, 4, h, w): the task's prediction in latent space
    loss: torch.Tensor  # L_agg
    per_layer: dict[str, torch.Tensor]


class D3Model(nn.Module):
    """Everything that is trained: the student (UNet or DiT), its timestep and the projection heads.

    The frozen teacher lives outside (its features are an input), so checkpoints and optimizer state hold only
    what changes. `student` is the diffusers model (registered as `student`, so parameter names are the model's)
    or its `Denoiser`; `self.denoiser` makes the architecture-specific calls. `student_timestep=None` takes the
    architecture's default (261 for the UNet, `d3.denoisers.DIT_STUDENT_TIMESTEP` for a DiT).
    """

    def __init__(
        self,
        student: nn.Module | Denoiser,
        heads: ProjectionHeads,
        layers: list[str],
        student_timestep: float | None = OFFICIAL_STUDENT_TIMESTEP,
        learn_timestep: bool = True,
    ):
        super().__init__()
        self.denoiser = as_denoiser(student)  # a plain attribute: the module is registered once, as `student`
        self.student = self.denoiser.model
        self.heads = heads
        self.layers = list(layers)
        if student_timestep is None:
            student_timestep = self.denoiser.default_student_timestep
        self.student_timestep = nn.Parameter(torch.tensor(float(student_timestep)), requires_grad=learn_timestep)
        self.capture = self.denoiser.feature_capture(self.layers)

    def predict(self, latents: torch.Tensor, prompt_embeds: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """The one-step prediction: clean latent in, task latent out (inference uses exactly this)."""
        return self.denoiser(latents, self.student_timestep, prompt_embeds)

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        expert: dict[str, torch.Tensor],
        timesteps: torch.Tensor,
    ) -> AlignmentOutput:
        prediction = self.predict(latents, prompt_embeds)
        loss, per_layer = alignment_loss(self.heads, self.capture.pop(), expert, timesteps)
        return AlignmentOutput(prediction, loss, per_layer)


def layer_channels(model: nn.Module | Denoiser, layers: list[str]) -> dict[str, int]:
    """Channel count of each hooked layer of any denoising network (UNet or DiT), without running it on data."""
    return as_denoiser(model).feature_channels(layers)
