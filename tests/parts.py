"""Build the pieces of a D³ training step from a backbone folder (shared by equivalence tests and benchmarks)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from d3.aggregation import D3Model, layer_channels
from d3.backbone import encode_prompt, load_backbone
from d3.features import FeatureCapture, unet_layer_set
from d3.heads import ProjectionHeads


@dataclass
class StepParts:
    model: D3Model
    teacher: torch.nn.Module
    teacher_capture: FeatureCapture
    vae: torch.nn.Module
    scheduler: object
    prompt_embeds: torch.Tensor


def build_parts(backbone_dir, prompt: str = "a depth map", head_type: str = "cleandift", layer_set: str = "up",
                perturb_heads: bool = True, seed: int = 0) -> StepParts:
    """Student, frozen teacher, heads and VAE in fp32. `perturb_heads` leaves the identity init so that the heads'
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
