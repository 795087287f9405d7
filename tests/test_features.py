"""Alignment hooks on stock diffusers UNets: the official 11-layer `up` set on SD 2.1 shapes, other sets, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from d3.features import FeatureCapture, feature_shapes, official_key_names, unet_layer_set
from d3.tiny import unet_config

# docs/protocols.md, "Training recipe": key -> (channels, spatial size) for a 768x768 input (96x96 latent).
OFFICIAL_UP = {
    "mid": (1280, 12), "us1": (1280, 12), "us2": (1280, 12), "us3": (1280, 24), "us4": (1280, 24),
    "us5": (1280, 24), "us6": (1280, 48), "us7": (640, 48), "us8": (640, 48), "us9": (640, 96), "us10": (320, 96),
}


@pytest.fixture(scope="module")
def sd21_meta_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config("sd21"))


@pytest.mark.quick
def test_up_set_on_sd21_matches_the_official_keys(sd21_meta_unet):
    layers = unet_layer_set(sd21_meta_unet, "up")
    assert len(layers) == 11
    meta = torch.device("meta")
    shapes = feature_shapes(sd21_meta_unet, layers, torch.empty(1, 4, 96, 96, device=meta),
                            torch.tensor([261.0], device=meta), encoder_hidden_states=torch.empty(1, 77, 1024, device=meta))
    got = {key: (s[1], s[2]) for key, s in zip(official_key_names(layers), shapes.values())}
    assert got == OFFICIAL_UP
    assert all(s[2] == s[3] for s in shapes.values())


def test_other_sets_on_sd21(sd21_meta_unet):
    down = unet_layer_set(sd21_meta_unet, "down")
    assert len(down) == 4 * 2 + 3  # two layers per down block, three downsamplers
    everything = unet_layer_set(sd21_meta_unet, "all")
    assert set(down) < set(everything) and "mid_block" in everything
    assert len(everything) == len(down) + 1 + 4 * 3 + 3  # + mid, three layers per up block, three upsamplers
    explicit = unet_layer_set(sd21_meta_unet, "mid_block, up_blocks.1.attentions.0")
    assert explicit == ["mid_block", "up_blocks.1.attentions.0"]


@pytest.mark.quick
def test_capture_on_a_real_forward_returns_each_layer_once(tiny_backbone_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_backbone_dir, subfolder="unet")
    layers = unet_layer_set(unet, "up")
    assert len(layers) == 1 + 3 + 3 + 1  # mid, 2 layers + upsampler for the 2 inner up blocks, 1 of the last
    capture = FeatureCapture(unet, layers)
    with torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), torch.tensor(10), encoder_hidden_states=torch.randn(2, 77, 32))
    feats = capture.pop()
    assert list(feats) == layers and all(f.shape[0] == 2 and f.dim() == 4 for f in feats.values())
    with pytest.raises(RuntimeError, match="no features captured"):
        capture.pop()  # nothing leaks from one pass into the next
    capture.remove()


def test_unknown_layer_names_fail_clearly(sd21_meta_unet):
    with pytest.raises(ValueError, match="up_blocks.9.resnets.0"):
        unet_layer_set(sd21_meta_unet, "up_blocks.9.resnets.0")
    with pytest.raises(ValueError, match="no module"):
        FeatureCapture(sd21_meta_unet, ["nope"])
