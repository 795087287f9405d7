"""Activation checkpointing of the projection heads (`--gradient_checkpointing`, d3.objective.alignment_loss).

The heads' activations grow with batch × expert timesteps × tokens × channels per aligned layer (FLUX.1 at 768²:
tens of GB), and the student's and VAE's checkpointing does not cover them. With the heads' checkpointing on, each
layer's broadcast, head and cosine are recomputed in the backward pass:
- the D³ step's loss and every gradient are those of the plain step (fp32, tiny backbone);
- autograd keeps fewer bytes for backward: the alignment loss alone keeps almost nothing (only the time mapping),
  and the whole step keeps less by about what the heads kept.
"""

from __future__ import annotations

import pytest
import torch

import train_depth
from d3.objective import Objective, alignment_loss, d3_step, expert_features
from d3.reference_step import build_parts
from d3.timesteps import stratified_timesteps
from d3.training_setup import apply_speed_flags
from tests.helpers import grads
from tests.test_equivalence import depth_batch

pytestmark = pytest.mark.usefixtures("one_thread")


class SavedBytes:
    """Bytes of the distinct storages autograd keeps for backward while the context is open, other than the
    parameters' own (saved weights are no activations)."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.weights:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _setup(backbone):
    torch.manual_seed(0)
    parts = build_parts(backbone)
    batch = depth_batch(2, 32)
    g = torch.Generator().manual_seed(0)
    timesteps = stratified_timesteps(2, 3, generator=g)
    noise = torch.randn(2, 3, 4, 8, 8, generator=g)  # tiny VAE: 32 px -> 8² latents
    return parts, batch, timesteps, noise


def _step(parts, batch, timesteps, noise, meter=None):
    parts.model.zero_grad(set_to_none=True)
    if meter is None:
        out = d3_step(parts.model, parts.experts(), parts.vae, parts.prompt_embeds,
                      Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS), batch, timesteps, noise)
    else:
        with meter:
            out = d3_step(parts.model, parts.experts(), parts.vae, parts.prompt_embeds,
                          Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS), batch, timesteps, noise)
    out.loss.backward()
    return out, grads(parts.model)


def test_head_checkpointing_keeps_loss_and_gradients(tiny_backbone_dir):
    parts, batch, timesteps, noise = _setup(tiny_backbone_dir)
    plain, plain_grads = _step(parts, batch, timesteps, noise)
    apply_speed_flags(parts.model, parts.teacher, parts.vae, gradient_checkpointing=True)
    assert parts.model.heads.gradient_checkpointing  # the training flag reaches the heads
    # only the heads differ between the two runs: the student and the VAE go back to the plain path
    parts.model.student.disable_gradient_checkpointing()
    parts.vae.disable_gradient_checkpointing()
    ckpt, ckpt_grads = _step(parts, batch, timesteps, noise)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-6, atol=0)
    for layer in plain.per_layer:
        torch.testing.assert_close(ckpt.per_layer[layer], plain.per_layer[layer], rtol=1e-6, atol=0)
    assert set(ckpt_grads) == set(plain_grads)
    head_grads = [n for n in plain_grads if n.startswith("heads.adapters.")]
    assert head_grads and any(plain_grads[n].abs().sum() > 0 for n in head_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_head_checkpointing_keeps_fewer_bytes_for_backward(tiny_backbone_dir):
    parts, batch, timesteps, noise = _setup(tiny_backbone_dir)
    model = parts.model
    b, n = timesteps.shape

    def align_bytes():
        # the heads alone, on student features shaped as the hooked layers' (the teacher's, one per image)
        student = {k: torch.randn(b, *v.shape[1:], requires_grad=True) for k, v in expert.items()}
        with SavedBytes(model) as meter:
            loss, _ = alignment_loss(model.heads, student, expert, timesteps)
        loss.backward()
        return meter.total

    with torch.no_grad():
        latents = torch.randn(b, 4, 8, 8)
        expert = expert_features(parts.teacher, parts.teacher_capture, parts.scheduler, latents, parts.prompt_embeds,
                                 timesteps, noise)
    plain_align = align_bytes()
    plain_step = SavedBytes(model)
    _step(parts, batch, timesteps, noise, plain_step)

    model.heads.enable_gradient_checkpointing()
    ckpt_align = align_bytes()
    ckpt_step = SavedBytes(model)
    _step(parts, batch, timesteps, noise, ckpt_step)

    # what the heads keep at all is per token: the time mapping (per timestep, kept outside) is all that is left
    assert ckpt_align < 0.1 * plain_align, (ckpt_align, plain_align)
    assert ckpt_step.total < plain_step.total
    assert plain_step.total - ckpt_step.total > 0.5 * (plain_align - ckpt_align), (plain_step.total, ckpt_step.total)
