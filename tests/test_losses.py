"""Task losses against hand computations: pooled reductions, native-size resizing, empty masks give 0, never NaN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d3.losses import depth_losses, differentiable_scale_shift, matting_losses, multiscale_gradient_loss, normal_losses

pytestmark = pytest.mark.quick


def img(values: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) map in [0,1] -> 3-channel image in [-1,1]."""
    return (values * 2 - 1).expand(-1, 3, -1, -1)


def test_depth_mse_pools_the_valid_pixels_of_the_whole_batch():
    """Sample 0 has 2 valid pixels with squared errors 1 and 4, sample 1 one with error 9: the authors' masked MSE
    is (1 + 4 + 9) / 3, not the mean of per-image means (2.5 + 9) / 2."""
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2)
    target[0, :, 0, 0], target[0, :, 0, 1], target[1, :, 1, 1] = 1.0, 2.0, 3.0
    valid = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0, :] = True
    valid[1, 0, 1, 1] = True
    depth = torch.ones(2, 1, 2, 2)
    assert math.isclose(float(depth_losses(pred, target, depth, valid)["mse"]), 14 / 3, rel_tol=1e-6)


def test_depth_terms_are_taken_at_the_ground_truths_size():
    """A 4x4 prediction against a 2x8 ground truth: the bilinear resize (no antialias) happens before the terms."""
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    target = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    depth = torch.rand(1, 2, 8, generator=g) + 1
    valid = torch.ones(1, 2, 8, dtype=torch.bool)
    terms = depth_losses(pred, target, [depth], [valid])
    p = F.interpolate(pred, size=(2, 8), mode="bilinear", align_corners=False)
    t = F.interpolate(target, size=(2, 8), mode="bilinear", align_corners=False)
    mse = ((p.mean(1) - t.mean(1)) ** 2).mean()
    assert math.isclose(float(terms["mse"]), float(mse), rel_tol=1e-6)
    # gradient term by hand: rows of 8 give 6 two-pixel pairs each; 2 rows -> 1-px vertical pairs are NOT used
    # (step 2 needs h > 2; here h = 2, so the step falls back to 1 in both directions)
    pu = (p * 0.5 + 0.5).clamp(0, 1).mean(1)
    gu = (t.mean(1) * 0.5 + 0.5).clamp(0, 1)
    r = torch.log1p(pu) - torch.log1p(gu)
    pairs = (r[..., 1:] - r[..., :-1]).abs().sum() + (r[..., 1:, :] - r[..., :-1, :]).abs().sum()
    assert math.isclose(float(terms["grad"]), float(pairs / (2 * 7 + 1 * 8)), rel_tol=1e-6)
    # at the training size the same prediction scores differently: the resolution matters
    square = depth_losses(pred, target, [F.interpolate(depth[None], size=(4, 4))[0]], [torch.ones(1, 4, 4).bool()])
    assert abs(float(square["mse"]) - float(terms["mse"])) > 1e-4


def test_empty_mask_contributes_zero_not_nan():
    pred = torch.rand(2, 3, 4, 4, requires_grad=True)
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    valid[0, 0, :2] = True  # sample 1 has no valid pixel
    depth = torch.rand(2, 1, 4, 4) + 1
    terms = depth_losses(pred, pred.detach() + 0.5, depth, valid)
    for term in terms.values():
        assert torch.isfinite(term)
    sum(terms.values()).backward()
    assert torch.isfinite(pred.grad).all()
    none = torch.zeros_like(valid)
    empty = depth_losses(pred, pred.detach() + 0.5, depth, none)
    assert float(empty["ssi"].detach()) == 0.0 and float(empty["grad"].detach()) == 0.0
    # no valid pixel in the whole batch: the authors' MSE falls back to every pixel
    assert math.isclose(float(empty["mse"].detach()), 0.25, rel_tol=1e-6)


def test_scale_shift_fit_is_exact_for_affine_data():
    x = torch.rand(1, 5, 5)
    y = 3.5 * x + 0.25
    s, b, ok = differentiable_scale_shift(x, y, torch.ones_like(x, dtype=torch.bool))
    assert ok
    assert math.isclose(float(s), 3.5, rel_tol=1e-4) and math.isclose(float(b), 0.25, abs_tol=1e-4)


def test_affine_invariant_l1_is_zero_for_an_affine_depth_and_in_metres_otherwise():
    p = torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4)
    valid = torch.ones_like(p, dtype=torch.bool)
    assert float(depth_losses(img(p), img(p), 2 * p + 3, valid)["ssi"]) < 1e-4
    # A depth the prediction cannot explain: residual of the best line through (p, d), hand-computed with lstsq.
    d = torch.tensor([1.0, 4.0, 2.0, 8.0] * 4).view(1, 1, 4, 4)
    A = torch.stack([p.flatten(), torch.ones(16)], 1).double()
    coef = torch.linalg.lstsq(A, d.flatten().double()[:, None]).solution.flatten()
    expected = (A @ coef - d.flatten().double()).abs().mean()
    assert math.isclose(float(depth_losses(img(p), img(p), d, valid)["ssi"]), float(expected), rel_tol=1e-4)


def test_affine_invariant_l1_is_a_mean_of_per_image_means():
    p = torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4).expand(2, 1, 4, 4)
    d = torch.tensor([1.0, 4.0, 2.0, 8.0] * 4).view(1, 1, 4, 4)
    depth = torch.cat([2 * p[:1] + 3, d])  # image 0 explained exactly, image 1 not
    one = depth_losses(img(p[1:]), img(p[1:]), d, torch.ones(1, 1, 4, 4, dtype=torch.bool))["ssi"]
    valid = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    valid[1, 0, 0] = True
    both = depth_losses(img(p), img(p), depth, valid)["ssi"]
    assert math.isclose(float(both), float(one) / 2, rel_tol=1e-4)


def test_log_gradient_loss_by_hand():
    p = torch.zeros(1, 1, 3, 3)
    g = torch.zeros(1, 1, 3, 3)
    p[..., 0, 0] = 1.0  # one pixel differs
    valid = torch.ones_like(p, dtype=torch.bool)
    depth = torch.ones_like(p)
    # r = ln(1+p) - ln(1+g): ln2 at (0,0), 0 elsewhere. 3x3 > 2 -> 2-px pairs: 3 horizontal + 3 vertical pairs,
    # of which (0,0)-(0,2) and (0,0)-(2,0) differ by ln2.
    expected = 2 * math.log(2) / 6
    assert math.isclose(float(depth_losses(img(p), img(g), depth, valid)["grad"]), expected, rel_tol=1e-6)
    assert float(depth_losses(img(p), img(p), depth, valid)["grad"]) == 0.0
    valid[..., 0, 0] = False  # pairs touching an invalid pixel do not count
    assert float(depth_losses(img(p), img(g), depth, valid)["grad"]) == 0.0


def test_angular_loss_equals_arccos_against_the_native_normals_and_ignores_masked_pixels():
    pred = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]).T.reshape(1, 3, 1, 3)
    normal = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 3)
    valid = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    target = torch.zeros_like(pred)  # the MSE compares with the target image, the angle with the normals
    terms = normal_losses(pred, target, normal, valid)
    expected = (math.acos(1 - 1e-4) + math.pi / 2) / 2  # the first angle is clamped away from 0
    assert math.isclose(float(terms["angular"]), expected, rel_tol=1e-6)
    assert math.isclose(float(terms["mse"]), 2 / 6, rel_tol=1e-6)


def test_normal_losses_pool_over_images_of_different_sizes():
    pred = torch.zeros(2, 3, 2, 2)
    pred[:, 2] = 1.0  # every pixel predicts (0, 0, 1)
    n0 = torch.zeros(3, 1, 1)
    n0[2] = 1.0  # angle 0 (clamped), 1 pixel
    n1 = torch.zeros(3, 3, 3)
    n1[0] = 1.0  # angle π/2, 9 pixels
    terms = normal_losses(pred, pred, [n0, n1], [torch.ones(1, 1, 1).bool(), torch.ones(1, 3, 3).bool()])
    expected = (math.acos(1 - 1e-4) + 9 * math.pi / 2) / 10
    assert math.isclose(float(terms["angular"]), expected, rel_tol=1e-6)
    assert float(terms["mse"]) == 0.0


def test_matting_losses_by_hand():
    pred = torch.zeros(1, 3, 8, 8)
    target = torch.zeros(1, 3, 8, 8)
    target[..., :, 4:] = 1.0  # alpha 1 on the right half: +1 in [-1, 1]; prediction alpha 0.5
    terms = matting_losses(pred, target)
    assert math.isclose(float(terms["mse"]), 0.5, rel_tol=1e-6)
    assert math.isclose(float(terms["l1"]), 0.5, rel_tol=1e-6)


def test_multiscale_gradient_loss():
    a = torch.rand(1, 1, 8, 8)
    assert float(multiscale_gradient_loss(img(a), img(a))) < 1e-6  # the two sides round differently in fp32
    b = torch.zeros(1, 1, 8, 8)
    b[..., :, 4:] = 1.0  # one vertical edge; prediction flat
    zero = torch.zeros_like(b)
    # scale 1: one column of 8 forward differences of 1 among 8x7 -> 8/56; scale 2 (4x4): 4/12; scale 4 (2x2): 2/2
    expected = (8 / 56 + 4 / 12 + 2 / 2) / 3
    assert math.isclose(float(multiscale_gradient_loss(img(zero), img(b))), expected, rel_tol=1e-6)
