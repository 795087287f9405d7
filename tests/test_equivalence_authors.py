"""`d3_step` against the independent oracle of the authors' training step (`tests/authors_oracle.py`, which shares no
code with d3): the same files in the authors' layouts read by each side's own reader, the same timesteps and noise,
float64. Losses and every gradient (student, learned timestep, heads) agree to ≤ 1e-5 relative for all three tasks,
on ground truth smaller than, larger than and of another aspect than the training square. Perturbations show that
the comparison catches a wrong layer, a wrong head width and a loss at the wrong resolution."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import d3.heads
import train_depth
import train_matting
import train_normal
from d3.backbone import encode_prompt, load_backbone
from d3.data.folders import collate, open_sources
from d3.denoisers import as_denoiser
from d3.heads import ProjectionHeads
from d3.objective import D3Model, Objective, Teacher, d3_step
from d3.training_data import step_generator
from tests.authors_oracle import AuthorsHeads, authors_step, draw_timesteps
from tests.test_authors_oracle import depth_dir, matting_dir, normal_dir  # noqa: F401 (fixtures)
from tests.helpers import rel_err
from tests.test_equivalence import cast_batch

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
RES = 32
REL_TOL = 1e-5
TERM_NAMES = {"mse": "mse_sample", "ssi": "ssi_sample", "grad": "gradient", "angular": "angular_sample",
              "l1": "l1_sample"}
CASES = {  # task -> recipe, fixture, stems (GT smaller / larger / other aspect than the square)
    "depth": (train_depth.RECIPE, "depth_dir", ["ai_001_001", "Scene01_00001", "coco_0001"]),
    "normal": (train_normal.RECIPE, "normal_dir", ["sintel_a", "room_b"]),
    "matting": (train_matting.RECIPE, "matting_dir", ["p_1", "p_2"]),
}


class D3Side:
    """d3's student, teacher, heads and VAE in float64, built the way training builds them."""

    def __init__(self, backbone_dir: Path, prompt: str, head_type: str = "cleandift", layers=None, names=None):
        backbone = load_backbone(backbone_dir)
        self.prompt_embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, prompt).double()
        self.scheduler = backbone.scheduler
        self.teacher = backbone.unet.double().eval().requires_grad_(False)
        student = as_denoiser(copy.deepcopy(self.teacher).requires_grad_(True).train(), self.scheduler)
        self.layers = layers or student.layer_set("up")
        names = names or student.head_names(self.layers)
        heads = ProjectionHeads(student.feature_channels(self.layers), head_type, names)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # off the identity init, so the heads' parameters and time conditioning take part
            for p in heads.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        self.model = D3Model(student, heads, self.layers).double()
        self.capture = as_denoiser(self.teacher, self.scheduler).feature_capture(self.layers)
        self.vae = backbone.vae.double().eval().requires_grad_(False)
        self.names = {layer: heads.keys[layer] for layer in self.layers}

    def batch(self, root: Path, recipe, stems: list[str], loss_resolution: str = "native") -> dict:
        """The stems' samples as training reads them: the recipe's modality and target encoding."""
        samples = {}
        for source in open_sources(root, recipe.modality, RES, recipe.encode_target, loss_resolution=loss_resolution):
            for i, (image, _, _) in enumerate(source.items):
                samples[image.stem] = source[i]
        return cast_batch(collate([samples[s] for s in stems]), torch.float64)

    def step(self, recipe, batch, timesteps, noise):
        self.model.zero_grad(set_to_none=True)
        out = d3_step(self.model, Teacher(self.teacher, self.capture, self.scheduler), self.vae, self.prompt_embeds,
                      Objective(recipe.task_loss, recipe.loss_weights), batch, timesteps, noise)
        out.loss.backward()
        grads = {f"student.{n}": p.grad.clone() for n, p in self.model.student.named_parameters()}
        grads.update({f"heads.{n}": p.grad.clone() for n, p in self.model.heads.named_parameters()})
        grads["timestep"] = self.model.student_timestep.grad.clone()
        return out, grads

    def oracle(self, root, stems, task, timesteps, noise):
        heads = None
        if self.model.heads.head_type == "cleandift":
            dims = {self.names[layer]: self.model.heads.adapters[self.names[layer]].layers[0].up_proj.in_features
                    for layer in self.layers}
            heads = AuthorsHeads(dims).double()
            heads.load_state_dict(self.model.heads.state_dict(), strict=True)
        self.model.zero_grad(set_to_none=True)
        out = authors_step(self.model.student, self.model.student_timestep, self.teacher, self.vae, self.scheduler,
                           heads, self.prompt_embeds, str(root), stems, task, RES, timesteps=timesteps,
                           noise=noise.reshape(-1, *noise.shape[2:]))
        out.total.backward()
        grads = {f"student.{n}": p.grad.clone() for n, p in self.model.student.named_parameters()}
        if heads is not None:
            grads.update({f"heads.{n}": p.grad.clone() for n, p in heads.named_parameters()})
        grads["timestep"] = self.model.student_timestep.grad.clone()
        return out, grads


def draws(batch_size: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return draw_timesteps(batch_size, 3, g), torch.randn(batch_size, 3, 4, RES // 4, RES // 4, generator=g).double()


def compare(side: D3Side, task: str, request, loss_resolution: str = "native"):
    recipe, fixture, stems = CASES[task]
    root = request.getfixturevalue(fixture)
    timesteps, noise = draws(len(stems))
    ours, our_grads = side.step(recipe, side.batch(root, recipe, stems, loss_resolution), timesteps, noise)
    theirs, their_grads = side.oracle(root, stems, task, timesteps, noise)
    return ours, our_grads, theirs, their_grads


@pytest.mark.parametrize("task", list(CASES))
@pytest.mark.parametrize("head_type", ["cleandift", "none"])
def test_d3_step_equals_the_authors_step(tiny_backbone_dir, request, task, head_type):
    side = D3Side(tiny_backbone_dir, CASES[task][0].prompt, head_type)
    ours, our_grads, theirs, their_grads = compare(side, task, request)
    for layer in side.layers:
        assert rel_err(ours.per_layer[layer], theirs.align[side.names[layer]]) <= REL_TOL, layer
    assert set(map(TERM_NAMES.get, ours.task_terms)) == set(theirs.task)
    for term, value in ours.task_terms.items():
        assert float(value.detach()) > 0, term  # every term takes part in what is compared
        assert rel_err(value, theirs.task[TERM_NAMES[term]]) <= REL_TOL, term
    assert rel_err(ours.loss, theirs.total) <= REL_TOL
    assert set(our_grads) == set(their_grads)
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(their_grads)])  # noqa: E731
    assert rel_err(flat(our_grads), flat(their_grads)) <= REL_TOL
    for name, grad in their_grads.items():
        assert rel_err(our_grads[name], grad) <= REL_TOL or float(grad.norm()) < 1e-12, name
    assert float(their_grads["timestep"].abs()) > 0


def test_training_draws_timesteps_and_noise_as_the_authors_do(tiny_backbone_dir):
    """The loop's draw (`step_generator`, the denoiser's stratified timesteps, then the noise) is the authors' order
    and formula: the same generator gives the same values."""
    denoiser = load_backbone(tiny_backbone_dir).denoiser()
    g = step_generator(42, 5)
    t = denoiser.sample_timesteps(4, 3, generator=g)
    noise = torch.randn(4, 3, 4, 8, 8, generator=g)
    g = step_generator(42, 5)
    assert torch.equal(t, draw_timesteps(4, 3, g))
    assert torch.equal(noise.reshape(12, 4, 8, 8), torch.randn(12, 4, 8, 8, generator=g))


# ------------------------------------------------------------------------------------------------- perturbations
def test_the_comparison_catches_a_wrong_layer(tiny_backbone_dir, request):
    """One aligned layer moved (the up block's last resnet instead of its upsampler): the oracle's term differs."""
    denoiser = load_backbone(tiny_backbone_dir).denoiser()
    layers = denoiser.layer_set("up")
    names = denoiser.head_names(layers)
    moved = [layer.replace("upsamplers.0", "resnets.2") if layer.startswith("up_blocks.0.") else layer
             for layer in layers]
    assert moved != layers
    side = D3Side(tiny_backbone_dir, train_depth.PROMPT, layers=moved, names=dict(zip(moved, names.values())))
    ours, _, theirs, _ = compare(side, "depth", request)
    errors = {side.names[layer]: rel_err(ours.per_layer[layer], theirs.align[side.names[layer]])
              for layer in moved}
    assert errors["us3"] > 1e-3 and max(v for k, v in errors.items() if k != "us3") <= REL_TOL


def test_the_comparison_catches_a_wrong_head_width(tiny_backbone_dir):
    """A time mapping with d3's former hidden width (384 instead of the authors' 768) cannot pass for theirs."""
    side = D3Side(tiny_backbone_dir, train_depth.PROMPT)
    side.model.heads.mapping = d3.heads.MappingNetwork(hidden=384).double()
    dims = {side.names[layer]: side.model.heads.adapters[side.names[layer]].layers[0].up_proj.in_features
            for layer in side.layers}
    with pytest.raises(RuntimeError, match=r"size mismatch for mapping\.blocks\.0\.up_proj\.weight"):
        AuthorsHeads(dims).double().load_state_dict(side.model.heads.state_dict(), strict=True)


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_the_comparison_catches_a_loss_at_the_wrong_resolution(tiny_backbone_dir, request, task):
    """Ground truth resized to the training square first (`--loss_resolution train`): the task terms move."""
    side = D3Side(tiny_backbone_dir, CASES[task][0].prompt)
    ours, _, theirs, _ = compare(side, task, request, loss_resolution="train")
    errors = {term: rel_err(v, theirs.task[TERM_NAMES[term]]) for term, v in ours.task_terms.items()}
    assert max(errors.values()) > 1e-3, errors
    assert all(rel_err(ours.per_layer[layer], theirs.align[side.names[layer]]) <= REL_TOL for layer in side.layers)
