"""Loading the pretrained parts: local folders through the real loader, clear one-line failures otherwise."""

from __future__ import annotations

import pytest
import torch

from d3.backbone import BackboneLoadError, decode_latent, encode_image, encode_prompt, load_backbone


def test_local_folder_loads_and_prompt_is_embedded_once(tiny_backbone_dir):
    backbone = load_backbone(tiny_backbone_dir)
    embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, "A surface normal estimation map.")
    assert embeds.shape == (1, 77, 32)
    backbone.release_text_encoder()
    assert backbone.text_encoder is None and backbone.tokenizer is None
    # deterministic latents (posterior mean), and a decode that keeps the image size
    rgb = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z1, z2 = encode_image(backbone.vae, rgb), encode_image(backbone.vae, rgb)
        assert torch.equal(z1, z2) and z1.shape == (1, 4, 8, 8)
        assert decode_latent(backbone.vae, z1).shape == (1, 3, 32, 32)


def test_unreachable_hub_id_fails_in_one_line_naming_a_local_folder():
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("stabilityai/this-model-is-not-cached")
    message = str(err.value)
    assert "\n" not in message and "local diffusers folder" in message


def test_missing_or_incomplete_local_folders(tmp_path, tiny_backbone_dir):
    with pytest.raises(BackboneLoadError, match="no such folder"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "partial").mkdir()
    with pytest.raises(BackboneLoadError, match="unet"):
        load_backbone(str(tmp_path / "partial"))
