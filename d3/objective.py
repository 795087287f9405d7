"""The D³ objective in one file (paper §3.2, Eq. 2–4), top to bottom as a training step runs it.

Per batch of B images and N_T expert timesteps:
1. the clean latent z = E(x) (the VAE posterior mean, no gradient);
2. expert timesteps, one per stratified bin (`Denoiser.sample_timesteps`), and Gaussian noise ε;
3. the teacher ("visual experts", frozen) sees the B·N_T noisy latents x_t = add_noise(z, ε, t) in ONE no-grad pass;
   its hooked layers give the experts' features (`expert_features`);
4. the student sees z once per image at its own (learned or fixed) timestep (`D3Model.forward`). Its input does not
   depend on t, so its features are computed once and broadcast over the N_T timesteps; the official code runs the
   student (and the VAE decoder) on N_T identical copies, which gives the same losses and gradients at N_T times the
   cost (`d3/reference_step.py` keeps that batching and the tests hold the two equal);
5. the projection heads map the student's features into each expert timestep's space, and
   L_agg = Σ_k (1 − mean cosine similarity over batch, timesteps and tokens) (`alignment_loss`);
6. the student's output latent is decoded by the frozen VAE, and the task recipe's loss terms are taken on it;
7. L = λ_align·L_agg + λ_task·Σ_j w_j·L_task,j (`d3_step`).

Why the student's features reach the heads inside `D3Model.forward` (hooks fill `capture` during the student's call,
`forward` reads them): distributed wrappers (DDP, FSDP) only see computation that runs inside the wrapped module's
forward, so the heads must run there too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .denoisers import Denoiser, as_denoiser
from .features import FeatureCapture
from .heads import ProjectionHeads
from .latents import decode_latent, encode_image

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
    """L_agg and its per-layer terms. Student features (B, C, H, W) are broadcast over the N_T timesteps.

    With `heads.gradient_checkpointing` (`--gradient_checkpointing`) each layer's broadcast, head and cosine run
    under non-reentrant activation checkpointing: nothing of them is kept for backward, where they are recomputed
    one layer at a time (same loss and gradients; the heads' activations are B·N_T·tokens·C-sized per layer).
    """
    b, n = timesteps.shape
    c = heads.time_condition(timesteps.reshape(-1))

    def layer_term(layer: str, feat: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        tok = tokens(feat)
        tok = tok.unsqueeze(1).expand(b, n, *tok.shape[1:]).reshape(b * n, *tok.shape[1:])
        pred = heads.project(layer, tok, c)
        target = tokens(target).to(pred.dtype)
        return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()

    recompute = heads.gradient_checkpointing and torch.is_grad_enabled()
    per_layer = {}
    for layer, feat in student_features.items():
        if recompute:
            per_layer[layer] = checkpoint(layer_term, layer, feat, expert[layer], c, use_reentrant=False)
        else:
            per_layer[layer] = layer_term(layer, feat, expert[layer], c)
    total = torch.stack(list(per_layer.values())).sum()
    return total, per_layer


@dataclass
class AlignmentOutput:
    prediction: torch.Tensor  # the student's output latent (B, 4, h, w): the task's prediction in latent space
    loss: torch.Tensor  # L_agg
    per_layer: dict[str, torch.Tensor]
    timestep: torch.Tensor | None = None  # the student timestep this forward used (0-dim, detached)


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
        # Shape (1,), not a 0-dim scalar: FSDP1 refuses to shard scalar parameters. `timestep` is the scalar view.
        self.student_timestep = nn.Parameter(torch.tensor([float(student_timestep)]), requires_grad=learn_timestep)
        self.capture = self.denoiser.feature_capture(self.layers)

    @property
    def timestep(self) -> torch.Tensor:
        """The learned timestep as a 0-dim tensor (in the graph). Under FSDP the parameter is a view of this process's
        shard outside forward and backward (empty on every process but one), so read it inside `forward` only."""
        return self.student_timestep.reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the timestep became shape (1,) hold it as a 0-dim tensor: accept those.
        key = prefix + "student_timestep"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def predict(self, latents: torch.Tensor, prompt_embeds: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """The one-step prediction: clean latent in, task latent out (inference uses exactly this)."""
        return self.denoiser(latents, self.timestep, prompt_embeds)

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        expert: dict[str, torch.Tensor],
        timesteps: torch.Tensor,
    ) -> AlignmentOutput:
        prediction = self.predict(latents, prompt_embeds)
        loss, per_layer = alignment_loss(self.heads, self.capture.pop(), expert, timesteps)
        # a copy: under FSDP the parameter's full storage is freed after forward
        return AlignmentOutput(prediction, loss, per_layer, self.timestep.detach().clone())


def layer_channels(model: nn.Module | Denoiser, layers: list[str]) -> dict[str, int]:
    """Channel count of each hooked layer of any denoising network (UNet or DiT), without running it on data."""
    return as_denoiser(model).feature_channels(layers)


# ------------------------------------------------------------------------------------------------------- the step
@dataclass
class Teacher:
    """The frozen pretrained network, the ensemble of visual experts: the model (or its `Denoiser`), the hooks on
    its layers, and the DDPM scheduler that noises a UNet's inputs (None for a DiT, whose Denoiser owns the noise)."""

    model: nn.Module | Denoiser
    capture: FeatureCapture
    scheduler: object | None = None


@dataclass
class Objective:
    """What is minimised: the recipe's task loss (decoded prediction, batch -> named terms), the terms' weights,
    and the two λ of L = λ_align·L_agg + λ_task·L_task."""

    task_loss: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]
    weights: dict[str, float]
    lambda_task: float = 1.0
    lambda_align: float = 1.0

    def total(self, align: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        task = sum(self.weights[k] * v for k, v in terms.items())
        return self.lambda_align * align + self.lambda_task * task


@dataclass
class StepOutput:
    loss: torch.Tensor
    align: torch.Tensor
    task_terms: dict[str, torch.Tensor]
    per_layer: dict[str, torch.Tensor]
    prediction: torch.Tensor | None  # decoded (B, 3, H, W); None once `detach`ed
    timestep: torch.Tensor | None = None  # the student timestep the step used (0-dim, detached): every process has it

    def detach(self) -> StepOutput:
        """The step's values without its autograd graph or its decoded prediction. Whatever keeps a `StepOutput`
        past its backward (or past a skipped backward) should keep this instead: the graph holds every activation
        saved for backward, which would otherwise stay alive through the next step's forward."""
        return StepOutput(self.loss.detach(), self.align.detach(), {k: v.detach() for k, v in self.task_terms.items()},
                          {k: v.detach() for k, v in self.per_layer.items()}, None, self.timestep)


def d3_step(
    model: D3Model,
    teacher: Teacher,
    vae: nn.Module,
    prompt_embeds: torch.Tensor | dict[str, torch.Tensor],
    objective: Objective,
    batch: dict,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> StepOutput:
    """One D³ training step's losses: teacher once on B·N_T noisy latents, student and decoder once per image."""
    dtype = next(model.parameters()).dtype  # fp32 master weights in training (autocast does the rest)
    with torch.no_grad():
        latents = encode_image(vae, batch["rgb"]).to(dtype)
    expert = expert_features(teacher.model, teacher.capture, teacher.scheduler, latents, prompt_embeds, timesteps,
                             noise)
    out = model(latents, prompt_embeds, expert, timesteps)
    prediction = decode_latent(vae, out.prediction)
    terms = objective.task_loss(prediction, batch)
    return StepOutput(objective.total(out.loss, terms), out.loss, terms, out.per_layer, prediction, out.timestep)
