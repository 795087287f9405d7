"""The training step batched as the authors batch it: the baseline of `benchmarks/train_step.py`, and the check that
`d3_step`'s batching changes nothing (the independent oracle of the authors' whole step is `tests/authors_oracle.py`).

Per image the authors' code makes N_T copies; every copy runs the frozen expert at its own noisy timestep AND the
student on the (identical) clean latent, every copy's student output is decoded by the VAE, and the task loss is
averaged over the copies. It also encodes the target image with the VAE, which it never uses. `d3_step` must give
the same losses and gradients while running the student and the decoder once per image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import encode_prompt, load_backbone
from .denoisers import as_denoiser
from .features import FeatureCapture, unet_layer_set
from .heads import ProjectionHeads
from .latents import decode_latent, encode_image
from .objective import D3Model, Objective, StepOutput, Teacher, layer_channels


def _repeat(batch: dict, n: int) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.repeat_interleave(n, dim=0)
        else:
            out[key] = [v for v in value for _ in range(n)]
    return out


def per_copy_step(
    model: D3Model,
    teacher: Teacher,
    vae,
    prompt_embeds: torch.Tensor | dict[str, torch.Tensor],
    objective: Objective,
    batch: dict,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> StepOutput:
    """`d3_step`'s arguments and result, computed on N_T copies of every image as the authors' code does."""
    b, n = timesteps.shape
    t = timesteps.reshape(-1)
    with torch.no_grad():
        latents = encode_image(vae, batch["rgb"]).to(next(model.parameters()).dtype)
        encode_image(vae, batch["target"])  # the official loop encodes the target too and never uses it
    copies = latents.repeat_interleave(n, dim=0)
    # The architecture-specific calls (UNet: scheduler.add_noise, UNet(z, t, encoder_hidden_states); DiT: flow
    # matching, packing, pooled text) go through the same Denoiser adapter as the efficient step.
    experts = as_denoiser(teacher.model, teacher.scheduler)

    with torch.no_grad():
        noisy = experts.add_noise(copies, noise.reshape(copies.shape), t)
        experts(noisy.to(experts.dtype), t, prompt_embeds)
        expert = teacher.capture.pop()

    prediction = model.denoiser(copies, model.student_timestep, prompt_embeds)
    student_features = model.capture.pop()

    per_layer = {}
    for layer, feature in student_features.items():
        tok = feature.flatten(2).transpose(1, 2)  # (B·N, L, C)
        projected = model.heads({layer: tok}, t)[layer]
        target = expert[layer].flatten(2).transpose(1, 2)
        per_layer[layer] = 1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
    align = sum(per_layer.values())

    decoded = decode_latent(vae, prediction)
    terms = objective.task_loss(decoded, _repeat(batch, n))
    return StepOutput(objective.total(align, terms), align, terms, per_layer, decoded[::n])


@dataclass
class StepParts:
    model: D3Model
    teacher: torch.nn.Module
    teacher_capture: FeatureCapture
    vae: torch.nn.Module
    scheduler: object
    prompt_embeds: torch.Tensor

    def experts(self) -> Teacher:
        """The frozen teacher as `d3_step` and `per_copy_step` take it."""
        return Teacher(self.teacher, self.teacher_capture, self.scheduler)


def build_parts(backbone_dir, prompt: str = "a depth map", head_type: str = "cleandift", layer_set: str = "up",
                perturb_heads: bool = True, seed: int = 0) -> StepParts:
    """The pieces of a training step from a backbone folder, for the equivalence tests and the step benchmark:
    student, frozen teacher, heads and VAE in fp32. `perturb_heads` leaves the identity init so that the heads'
    own parameters and time conditioning take part in the computation being compared."""
    backbone = load_backbone(backbone_dir)
    embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, prompt)
    teacher = backbone.unet.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    layers = unet_layer_set(student, layer_set)
    heads = ProjectionHeads(layer_channels(student, layers), head_type)
    if perturb_heads:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = D3Model(student, heads, layers)
    return StepParts(model, teacher, FeatureCapture(teacher, layers), backbone.vae.requires_grad_(False).eval(),
                     backbone.scheduler, embeds)
