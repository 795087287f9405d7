"""`--compile` through a real training step (student, teacher, VAE compiled as `apply_speed_flags` does), with and
without `--gradient_checkpointing`, on dynamo's aot_eager backend (AOT autograd without code generation: the
graphs a GPU's inductor would get, cheap on a CPU): the same loss and gradients as eager mode, one graph per
compiled module, no graph break (the feature hooks sit inside checkpointed blocks), and no recompile on the
next step."""

from __future__ import annotations

import pytest
import torch

import train_depth
from d3.objective import Objective, d3_step
from d3.reference_step import build_parts
from d3.timesteps import stratified_timesteps
from d3.training_setup import apply_speed_flags
from tests.helpers import grads, rel_err
from tests.test_equivalence import depth_batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_compiled_training_step_matches_eager_in_one_graph_per_module(tiny_backbone_dir, checkpointing):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    parts = build_parts(tiny_backbone_dir)
    batch = depth_batch(2, 32)
    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(2, 3, generator=g)
    noise = torch.randn(2, 3, 4, 8, 8, generator=g)
    objective = Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS)

    def step():
        parts.model.zero_grad(set_to_none=True)
        out = d3_step(parts.model, parts.experts(), parts.vae, parts.prompt_embeds, objective, batch, t, noise)
        out.loss.backward()
        return out.loss.detach(), grads(parts.model)

    apply_speed_flags(parts.model, parts.teacher, parts.vae, gradient_checkpointing=checkpointing)
    eager_loss, eager_grads = step()
    dynamo.reset()
    counters.clear()
    try:
        apply_speed_flags(parts.model, parts.teacher, parts.vae, gradient_checkpointing=checkpointing, compile=True,
                          compile_backend="aot_eager")
        loss, compiled_grads = step()
        graphs = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
        again, _ = step()
        assert counters["stats"]["unique_graphs"] == graphs  # the next step reuses them
    finally:
        dynamo.reset()
    assert breaks == {}
    assert graphs == 4  # student, teacher, VAE encoder, VAE decoder (before the fix: 12, then 22 after the next step)
    assert rel_err(loss, eager_loss) < 1e-5 and rel_err(again, eager_loss) < 1e-5
    assert compiled_grads.keys() == eager_grads.keys()
    worst = max(rel_err(compiled_grads[n], g_) for n, g_ in eager_grads.items() if float(g_.norm()) > 1e-12)
    assert worst < 1e-4, worst


@pytest.mark.quick
@pytest.mark.parametrize("limit_name", ["recompile_limit", "cache_size_limit"], ids=["torch>=2.7", "torch<2.7"])
def test_compile_settings_raise_the_recompile_limit_on_old_and_new_torch(monkeypatch, limit_name):
    """torch < 2.7 has no `recompile_limit` (setting an unknown dynamo option raises there): its `cache_size_limit`
    is raised instead; a torch without the checkpointing option keeps its graph breaks but still compiles."""
    from types import SimpleNamespace

    import torch._dynamo

    from d3.devices import compile_settings

    fake = SimpleNamespace(**{limit_name: 8})
    monkeypatch.setattr(torch._dynamo, "config", fake)
    compile_settings(checkpointing=True)
    assert vars(fake) == {limit_name: 64}
    fake.skip_fwd_side_effects_in_bwd_under_checkpoint = False
    compile_settings(recompiles=128, checkpointing=True)
    assert vars(fake) == {limit_name: 128, "skip_fwd_side_effects_in_bwd_under_checkpoint": True}
