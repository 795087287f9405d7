"""Projection heads: every variant starts as the identity; the default one is conditioned on the expert timestep."""

from __future__ import annotations

import pytest
import torch

from d3.heads import ProjectionHeads


@pytest.mark.parametrize("head_type", ["cleandift", "linear", "none"])
def test_heads_start_as_identity(head_type):
    heads = ProjectionHeads({"a": 16, "b.c": 8}, head_type)
    feats = {"a": torch.randn(3, 5, 16), "b.c": torch.randn(3, 7, 8)}
    out = heads(feats, torch.tensor([1, 500, 998]))
    # cleandift: RMS-normalised input enters zero-initialised residual branches -> exactly the input
    for key in feats:
        torch.testing.assert_close(out[key], feats[key])


def test_cleandift_heads_depend_on_the_timestep_once_trained():
    torch.manual_seed(0)
    heads = ProjectionHeads({"a": 16}, "cleandift")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 4, 16).expand(2, -1, -1)
    out = heads({"a": x}, torch.tensor([10, 900]))["a"]
    assert not torch.allclose(out[0], out[1])
    # ...and gradients reach the time mapping and every adapter block
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


def test_linear_heads_ignore_the_timestep():
    heads = ProjectionHeads({"a": 8}, "linear")
    with torch.no_grad():
        heads.heads["a"].weight.add_(torch.randn(8, 8))
    x = torch.randn(1, 4, 8).expand(2, -1, -1)
    out = heads({"a": x}, torch.tensor([10, 900]))["a"]
    torch.testing.assert_close(out[0], out[1])


def test_unknown_head_type():
    with pytest.raises(ValueError, match="cleandift"):
        ProjectionHeads({"a": 8}, "mlp")
