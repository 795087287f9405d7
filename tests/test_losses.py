"""Task losses against hand computations; empty masks give 0, never NaN."""

from __future__ import annotations

import math

import torch

from d3.losses import (
    affine_invariant_l1,
    angular_loss,
    depth_mse,
    fit_scale_shift,
    log_gradient_loss,
    multiscale_gradient_loss,
    normal_mse,
)


def img(values: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) map in [0,1] -> 3-channel image in [-1,1]."""
    return (values * 2 - 1).expand(-1, 3, -1, -1)


def test_depth_mse_counts_only_valid_pixels():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]]).expand(1, 3, 2, 2)
    valid = torch.tensor([[[[True, True], [False, False]]]])
    assert math.isclose(float(depth_mse(pred, target, valid)), (1 + 4) / 2)


def test_empty_mask_contributes_zero_not_nan():
    pred = torch.rand(2, 3, 4, 4, requires_grad=True)
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    valid[0, 0, :2] = True  # sample 1 has no valid pixel
    depth = torch.rand(2, 1, 4, 4) + 1
    terms = [depth_mse(pred, pred.detach() + 0.5, valid), affine_invariant_l1(pred, depth, valid),
             log_gradient_loss(pred, torch.zeros_like(pred), valid)]
    for term in terms:
        assert torch.isfinite(term)
    none = torch.zeros_like(valid)
    assert float(depth_mse(pred, pred + 1, none)) == 0.0
    assert float(affine_invariant_l1(pred, depth, none)) == 0.0
    total = sum(terms)
    total.backward()
    assert torch.isfinite(pred.grad).all()


def test_scale_shift_fit_is_exact_for_affine_data():
    x = torch.rand(2, 1, 5, 5)
    y = 3.5 * x + 0.25
    s, b, ok = fit_scale_shift(x, y, torch.ones_like(x, dtype=torch.bool))
    assert ok.all()
    torch.testing.assert_close(s, torch.full((2,), 3.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, torch.full((2,), 0.25), rtol=1e-4, atol=1e-4)


def test_affine_invariant_l1_is_zero_for_an_affine_depth_and_in_metres_otherwise():
    p = torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4)
    valid = torch.ones_like(p, dtype=torch.bool)
    assert float(affine_invariant_l1(img(p), 2 * p + 3, valid)) < 1e-4
    # A depth the prediction cannot explain: residual of the best line through (p, d), hand-computed with lstsq.
    d = torch.tensor([1.0, 4.0, 2.0, 8.0] * 4).view(1, 1, 4, 4)
    A = torch.stack([p.flatten(), torch.ones(16)], 1).double()
    coef = torch.linalg.lstsq(A, d.flatten().double()[:, None]).solution.flatten()
    expected = (A @ coef - d.flatten().double()).abs().mean()
    assert math.isclose(float(affine_invariant_l1(img(p), d, valid)), float(expected), rel_tol=1e-4)


def test_log_gradient_loss_by_hand():
    p = torch.zeros(1, 1, 3, 3)
    g = torch.zeros(1, 1, 3, 3)
    p[..., 0, 0] = 1.0  # one pixel differs
    valid = torch.ones_like(p, dtype=torch.bool)
    # r = ln(1+p) - ln(1+g): ln2 at (0,0), 0 elsewhere. 3x3 > 2 -> 2-px pairs: 3 horizontal + 3 vertical pairs,
    # of which (0,0)-(0,2) and (0,0)-(2,0) differ by ln2.
    expected = 2 * math.log(2) / 6
    assert math.isclose(float(log_gradient_loss(img(p), img(g), valid)), expected, rel_tol=1e-6)
    assert float(log_gradient_loss(img(p), img(p), valid)) == 0.0
    valid[..., 0, 0] = False  # pairs touching an invalid pixel do not count
    assert float(log_gradient_loss(img(p), img(g), valid)) == 0.0


def test_angular_loss_equals_arccos_and_ignores_masked_pixels():
    pred = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 3)
    valid = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    expected = (math.acos(1 - 1e-4) + math.pi / 2) / 2  # the first angle is clamped away from 0
    assert math.isclose(float(angular_loss(pred, target, valid)), expected, rel_tol=1e-6)
    assert math.isclose(float(normal_mse(pred, target, valid)), (0 + 2) / 6, rel_tol=1e-6)


def test_multiscale_gradient_loss():
    a = torch.rand(1, 1, 8, 8)
    assert float(multiscale_gradient_loss(img(a), img(a))) == 0.0
    b = torch.zeros(1, 1, 8, 8)
    b[..., :, 4:] = 1.0  # one vertical edge; prediction flat
    zero = torch.zeros_like(b)
    # scale 1: one column of 8 forward differences of 1 among 8x7 -> 8/56; scale 2 (4x4): 4/12; scale 4 (2x2): 2/2
    expected = (8 / 56 + 4 / 12 + 2 / 2) / 3
    assert math.isclose(float(multiscale_gradient_loss(img(zero), img(b))), expected, rel_tol=1e-6)
