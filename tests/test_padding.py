"""The network input is padded only to the VAE's factor (8 for SD), not to the UNet's full multiple (64 for SD):
diffusers' UNet upsamples each level to its skip connection's size, so the extra padding was only extra work
(a 4:3 photo at 192 px: 192×144 instead of 192×192)."""

from __future__ import annotations

import numpy as np

from d3.latents import unet_size_multiple, vae_scale_factor
from d3.predictor import D3Predictor


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_network_input_is_padded_to_the_vae_factor_only(tiny_depth_checkpoint):
    predictor = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu")
    m, full = vae_scale_factor(predictor.vae), unet_size_multiple(predictor.unet, predictor.vae)
    assert predictor.size_multiple == m < full  # tiny: 4 < 16 (SD: 8 < 64)
    x, undo = predictor.preprocess(_image(42, 58), processing_res=0, resize_mode="keep_aspect")
    up = lambda n, k: -(-n // k) * k  # noqa: E731
    assert tuple(x.shape) == (3, up(42, m), up(58, m)) != (3, up(42, full), up(58, full))
    assert undo[:4] == (42, 58, 42, 58)


def test_outputs_are_unchanged_where_the_padding_was_already_minimal(tiny_depth_checkpoint, monkeypatch):
    """Sizes that are multiples of the UNet's full multiple are padded by neither rule: the same bytes as before."""
    predictor = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu")
    full = unet_size_multiple(predictor.unet, predictor.vae)
    images = [_image(2 * full, 3 * full, 1), _image(full, full, 2)]
    now = predictor.predict(images, processing_res=0)
    monkeypatch.setattr(predictor, "size_multiple", full)  # the previous rule
    before = predictor.predict(images, processing_res=0)
    for a, b in zip(now, before):
        assert np.array_equal(a, b)


def test_odd_sizes_run_at_their_own_size(tiny_depth_checkpoint):
    """The UNet really runs on a latent that is not a multiple of its levels (diffusers upsamples each level to its
    skip connection's size), and the prediction comes back at the image's size. Where the previous rule padded more,
    the prediction cannot stay bitwise the same: the extra padded pixels took part in the UNet's convolutions and
    self-attention over the whole latent (on the random tiny model the two agree only loosely, correlation 0.34)."""
    predictor = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu")
    m, full = vae_scale_factor(predictor.vae), unet_size_multiple(predictor.unet, predictor.vae)
    seen = []
    hook = predictor.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        prediction = predictor.predict([_image(42, 58, 3)], processing_res=0)[0]
    finally:
        hook.remove()
    latent = (-(-42 // m), -(-58 // m))
    assert seen == [latent] and any(n % (full // m) for n in latent)
    assert prediction.shape == (42, 58) and np.isfinite(prediction).all()
