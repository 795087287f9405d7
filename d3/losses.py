"""Task losses on the decoded prediction (paper appendix 6.4; PROTOCOLS §6.5).

All take the VAE-decoded prediction `pred` (B, 3, H, W), nominally in [-1, 1], and return a scalar that is the mean
over the batch of a per-sample value. A sample with no valid pixel contributes exactly 0 (never NaN), so one bad
crop cannot poison a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` for each sample (B,), 0 where the mask is empty."""
    mask = mask.to(values.dtype).expand_as(values)
    dims = tuple(range(1, values.dim()))
    count = mask.sum(dims)
    total = (values * mask).sum(dims)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def to_unit_map(image: torch.Tensor) -> torch.Tensor:
    """Decoded 3-channel image in [-1, 1] -> single-channel map in [0, 1] (channel mean, as official inference)."""
    return (image * 0.5 + 0.5).clamp(0, 1).mean(1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------- depth
def depth_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE of the channel means, in the normalised [-1, 1] target space, over valid pixels."""
    err = (pred.float().mean(1, keepdim=True) - target.float().mean(1, keepdim=True)) ** 2
    return _per_sample_masked_mean(err, valid).mean()


def fit_scale_shift(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, min_det: float = 1e-6):
    """Closed-form least squares s, b minimising Σ_mask (s·x + b − y)² per sample, in fp32.

    Returns (scale, shift, ok), each (B,); `ok` is False where the system is degenerate (det ≤ min_det), as the
    official code rejects such fits. Gradients flow through s and b.
    """
    m = mask.float()
    x, y = x.float() * m, y.float() * m
    dims = tuple(range(1, x.dim()))
    a00, a01, a11 = (x * x).sum(dims), x.sum(dims), m.sum(dims)
    b0, b1 = (x * y).sum(dims), y.sum(dims)
    det = a00 * a11 - a01 * a01
    ok = det > min_det
    denom = det + 1e-6
    scale = (a11 * b0 - a01 * b1) / denom
    shift = (a00 * b1 - a01 * b0) / denom
    return scale, shift, ok


def affine_invariant_l1(pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 between the LS-aligned prediction and the raw depth (metres for metric sources), over valid pixels."""
    p = to_unit_map(pred.float())
    scale, shift, ok = fit_scale_shift(p, depth, valid)
    aligned = scale[:, None, None, None] * p + shift[:, None, None, None]
    per_sample = _per_sample_masked_mean((aligned - depth.float()).abs(), valid)
    return torch.where(ok, per_sample, torch.zeros_like(per_sample)).mean()


def _gradient_pairs(r: torch.Tensor, mask: torch.Tensor, step: int):
    """|r(i,j) − r(i,j+s)| and |r(i,j) − r(i+s,j)| with their both-ends-valid masks."""
    dx = (r[..., :, step:] - r[..., :, :-step]).abs()
    mx = mask[..., :, step:] & mask[..., :, :-step]
    dy = (r[..., step:, :] - r[..., :-step, :]).abs()
    my = mask[..., step:, :] & mask[..., :-step, :]
    return dx, mx, dy, my


def log_gradient_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Gradient matching in log space: r = ln(1+p̂) − ln(1+ĝ) on the [0,1] maps, 2-px differences (1 px if tiny)."""
    p, g = to_unit_map(pred.float()), to_unit_map(target.float())
    r = torch.log1p(p) - torch.log1p(g)
    step = 1 if min(r.shape[-2:]) <= 2 else 2
    dx, mx, dy, my = _gradient_pairs(r, valid.bool(), step)
    dims = (1, 2, 3)
    total = (dx * mx).sum(dims) + (dy * my).sum(dims)
    count = mx.sum(dims) + my.sum(dims)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).mean()


# --------------------------------------------------------------------------------------------------------- normals
def normal_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE over valid pixels and all 3 channels (target = unit normals, already in [-1, 1])."""
    err = (pred.float() - target.float()) ** 2
    return _per_sample_masked_mean(err, valid).mean()


def angular_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean angle in radians between predicted and true normals over valid pixels (float64, clamped acos)."""
    cos = F.cosine_similarity(pred.double(), target.double(), dim=1, eps=1e-8).unsqueeze(1)
    angle = torch.acos(cos.clamp(-1 + 1e-4, 1 - 1e-4))
    return _per_sample_masked_mean(angle, valid).mean().to(pred.dtype if pred.is_floating_point() else torch.float32)


def normal_valid_mask(target: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Valid = non-zero ground-truth normal."""
    return target.norm(dim=1, keepdim=True) > eps


# -------------------------------------------------------------------------------------------------------- matting
def matting_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2).mean()


def matting_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).abs().mean()


def multiscale_gradient_loss(pred: torch.Tensor, target: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """Mean over scales s of mean|Δx p − Δx g| + mean|Δy p − Δy g| after s×s average pooling of the [0,1] maps."""
    p, g = to_unit_map(pred.float()), to_unit_map(target.float())
    terms = []
    for s in scales:
        ps = F.avg_pool2d(p, s, s) if s > 1 else p
        gs = F.avg_pool2d(g, s, s) if s > 1 else g
        dx = ((ps[..., :, 1:] - ps[..., :, :-1]) - (gs[..., :, 1:] - gs[..., :, :-1])).abs().mean()
        dy = ((ps[..., 1:, :] - ps[..., :-1, :]) - (gs[..., 1:, :] - gs[..., :-1, :])).abs().mean()
        terms.append(dx + dy)
    return torch.stack(terms).mean()
