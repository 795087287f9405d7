"""Projection heads: every variant starts as the identity; the default one is conditioned on the expert timestep."""

from __future__ import annotations

import pytest
import torch

from d3.heads import ProjectionHeads

pytestmark = pytest.mark.quick


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
        heads.adapters["a"].weight.add_(torch.randn(8, 8))
    x = torch.randn(1, 4, 8).expand(2, -1, -1)
    out = heads({"a": x}, torch.tensor([10, 900]))["a"]
    torch.testing.assert_close(out[0], out[1])


def test_unknown_head_type():
    with pytest.raises(ValueError, match="cleandift"):
        ProjectionHeads({"a": 8}, "mlp")


SD21_UP_CHANNELS = {"mid": 1280, **{f"us{i}": 1280 for i in range(1, 7)}, **{f"us{i}": 640 for i in range(7, 10)},
                    "us10": 320}


def test_cleandift_heads_have_the_authors_shapes_names_and_parameter_count():
    """On SD 2.1's 11 up layers the authors' heads hold 125,047,808 trainable parameters (mapping 256→768 SwiGLU
    blocks, adapters at width C); the names are theirs, so their released heads load strictly."""
    with torch.device("meta"):
        heads = ProjectionHeads(SD21_UP_CHANNELS, "cleandift")
    assert sum(p.numel() for p in heads.parameters()) == 125_047_808
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    assert shapes["time_emb.weight"] == (128, 1)
    assert shapes["time_in_proj.weight"] == (256, 256)
    assert shapes["mapping.in_norm.scale"] == shapes["mapping.out_norm.scale"] == (256,)
    for i in range(2):
        assert shapes[f"mapping.blocks.{i}.norm.scale"] == (256,)
        assert shapes[f"mapping.blocks.{i}.up_proj.weight"] == (1536, 256)
        assert shapes[f"mapping.blocks.{i}.down_proj.weight"] == (256, 768)
    for j in range(3):
        assert shapes[f"adapters.us10.layers.{j}.norm.linear.weight"] == (320, 256)
        assert shapes[f"adapters.us10.layers.{j}.up_proj.weight"] == (640, 320)
        assert shapes[f"adapters.us10.layers.{j}.down_proj.weight"] == (320, 320)
    assert len(shapes) == 1 + 1 + 2 + 2 * 3 + 11 * 3 * 3


def test_a_fresh_time_mapping_adds_nothing_to_its_normalised_input():
    """Zero-initialised down-projections: each residual block of a fresh mapping is the identity."""
    heads = ProjectionHeads({"a": 8}, "cleandift")
    x = torch.randn(4, 256)
    for block in heads.mapping.blocks:
        torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    for layer in heads.adapters["a"].layers:
        assert not layer.down_proj.weight.detach().any() and not layer.norm.linear.weight.detach().any()


def test_up_layers_of_a_unet_take_the_authors_names(tiny_backbone_dir):
    from d3.backbone import load_backbone

    denoiser = load_backbone(tiny_backbone_dir).denoiser()
    layers = denoiser.layer_set("up")
    names = denoiser.head_names(layers)
    assert list(names.values()) == ["mid"] + [f"us{i}" for i in range(1, len(layers))]
    assert denoiser.head_names(denoiser.layer_set("down")) is None  # other sets keep their module paths
