"""Task losses on the decoded prediction, as the authors' training code computes them.

Depth and normals are scored at the ground truth's *native* size: the decoded R×R prediction and the R×R target image
are resized (bilinear, align_corners False, no antialias) to each sample's ground-truth size, and the terms are taken
there. Mattes are scored at the training resolution. With `--loss_resolution train` the readers hand over ground
truth already at R×R, the resizes are identities, and the same code scores at the training size.

Reductions follow the authors: MSE, log-gradient and angular terms pool their sums over every valid pixel of the
batch (not a mean of per-image means); the affine-invariant L1 is a mean over images of per-image means. The ground
truth of a batch is a list (one (C, h, w) tensor per image; sizes may differ) or a stacked tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DET_MIN = 1e-6  # the least-squares fit is rejected below this determinant, and regularised by it


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w), bilinear without antialias (the authors' F.interpolate call)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def unit_map(image: torch.Tensor) -> torch.Tensor:
    """Decoded image in [-1, 1] -> [0, 1] per channel, clamped (diffusers' postprocess), channel mean."""
    return (image * 0.5 + 0.5).clamp(0, 1).mean(1, keepdim=True)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.sum() * 0  # keeps the graph (and dtype/device) for a term with nothing to score


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------- depth
def differentiable_scale_shift(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    """Closed-form least squares (s, b) minimising Σ_mask (s·x + b − y)², in at least fp32.

    Returns (s, b, ok); `ok` is False where the system is degenerate (det ≤ 1e-6), as the authors reject such fits.
    Gradients flow through s and b. (The evaluation's alignment is `d3.metrics.lstsq_scale_shift`: float64, no
    gradient, lstsq's answer for a constant prediction.)
    """
    work = _work_dtype(x)
    m = mask.to(work)
    x, y = x.to(work), y.to(work)
    a00, a01, a11 = (m * x * x).sum(), (m * x).sum(), m.sum()
    b0, b1 = (m * x * y).sum(), (m * y).sum()
    det = a00 * a11 - a01 * a01
    scale = (a11 * b0 - a01 * b1) / (det + DET_MIN)
    shift = (a00 * b1 - a01 * b0) / (det + DET_MIN)
    return scale, shift, bool(det > DET_MIN)


def _gradient_sums(r: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ |r(i,j) − r(i,j+s)| + |r(i,j) − r(i+s,j)| over pairs valid at both ends, and the number of pairs.
    s = 2 px, or 1 px when the map is 2 px or less in either direction."""
    step = 2 if min(r.shape[-2:]) > 2 else 1
    mx = mask[..., :, step:] & mask[..., :, :-step]
    my = mask[..., step:, :] & mask[..., :-step, :]
    dx = (r[..., :, step:] - r[..., :, :-step]).abs()
    dy = (r[..., step:, :] - r[..., :-step, :]).abs()
    return (dx * mx).sum() + (dy * my).sum(), mx.sum() + my.sum()


def depth_losses(pred: torch.Tensor, target: torch.Tensor, depth: Sequence[torch.Tensor],
                 valid: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The depth terms: `mse` of the channel means against the normalised target image (in [-1, 1]), `ssi` the L1
    of the least-squares scale-and-shift-aligned [0, 1] prediction against the raw depth (metres for metric
    sources), `grad` the 2-px gradient matching of ln(1 + p̂) − ln(1 + ĝ) against the target image.

    pred, target: (B, 3, R, R); depth[i], valid[i]: (1, h_i, w_i) at the ground truth's size.
    """
    work = _work_dtype(pred)
    mse_sum = mse_n = grad_sum = grad_n = 0
    ssi, mse_all = [], []
    for i in range(pred.shape[0]):
        d, v = depth[i], valid[i].bool()
        size = d.shape[-2:]
        p = resize_to(pred[i:i + 1].to(work), size)[0]  # (3, h, w)
        t = resize_to(target[i:i + 1].to(work), size)[0]
        err = (p.mean(0, keepdim=True) - t.mean(0, keepdim=True)) ** 2
        mse_sum, mse_n = mse_sum + (err * v).sum(), mse_n + v.sum()
        mse_all.append(err)

        # post-processed (clamped to [0, 1]) at the training size, THEN resized, as the authors do
        p_unit = resize_to(unit_map(pred[i:i + 1].to(work)), size)[0]
        if v.any():
            s, b, ok = differentiable_scale_shift(p_unit, d, v)
            aligned = s * p_unit + b
            ssi.append((aligned - d.to(work)).abs()[v].mean() if ok else _zero(p_unit))
        else:
            ssi.append(_zero(p_unit))

        g_unit = (t.mean(0, keepdim=True) * 0.5 + 0.5).clamp(0, 1)
        sums, pairs = _gradient_sums(torch.log1p(p_unit) - torch.log1p(g_unit), v)
        grad_sum, grad_n = grad_sum + sums, grad_n + pairs
    if int(mse_n) > 0:
        mse = mse_sum / mse_n
    else:  # no valid pixel in the whole batch: the authors fall back to every pixel
        mse = torch.cat([e.flatten() for e in mse_all]).mean()
    grad = grad_sum / grad_n if int(grad_n) > 0 else _zero(pred)
    return {"mse": mse, "ssi": torch.stack(ssi).mean(), "grad": grad}


# --------------------------------------------------------------------------------------------------------- normals
def normal_losses(pred: torch.Tensor, target: torch.Tensor, normal: Sequence[torch.Tensor],
                  valid: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The normal terms: `mse` over valid pixels and the 3 channels against the target image, `angular` the mean
    angle (radians, float64, cosine clamped to ±(1 − 1e-4)) against the native normals.

    pred, target: (B, 3, R, R); normal[i]: (3, h_i, w_i) unit normals (0 = invalid); valid[i]: (1, h_i, w_i).
    """
    work = _work_dtype(pred)
    mse_sum = mse_n = ang_sum = ang_n = 0
    for i in range(pred.shape[0]):
        n, v = normal[i], valid[i].bool()
        size = n.shape[-2:]
        p = resize_to(pred[i:i + 1].to(work), size)[0]
        t = resize_to(target[i:i + 1].to(work), size)[0]
        mse_sum = mse_sum + (((p - t) ** 2) * v).sum()
        mse_n = mse_n + 3 * v.sum()
        cos = F.cosine_similarity(p.double(), n.double(), dim=0, eps=1e-8)[None]
        angle = cos.clamp(-1 + 1e-4, 1 - 1e-4).acos().to(work)
        ang_sum, ang_n = ang_sum + (angle * v).sum(), ang_n + v.sum()
    if int(mse_n) == 0:
        return {"mse": _zero(pred), "angular": _zero(pred)}
    return {"mse": mse_sum / mse_n, "angular": ang_sum / ang_n}


# -------------------------------------------------------------------------------------------------------- matting
def matting_losses(pred: torch.Tensor, target: torch.Tensor, scales=(1, 2, 4)) -> dict[str, torch.Tensor]:
    """The matting terms at the training resolution over the whole image: `mse` and `l1` on the 3 channels in
    [-1, 1]; `grad` the mean over scales s of mean|Δx p − Δx g| + mean|Δy p − Δy g| after s×s average pooling of
    the [0, 1] mattes."""
    work = _work_dtype(pred)
    pred, target = pred.to(work), target.to(work)
    return {
        "mse": ((pred - target) ** 2).mean(),
        "l1": (pred - target).abs().mean(),
        "grad": multiscale_gradient_loss(pred, target, scales),
    }


def multiscale_gradient_loss(pred: torch.Tensor, target: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    p = unit_map(pred)
    g = (target.mean(1, keepdim=True) * 0.5 + 0.5).clamp(0, 1)
    terms = []
    for s in scales:
        ps = F.avg_pool2d(p, s, s) if s > 1 else p
        gs = F.avg_pool2d(g, s, s) if s > 1 else g
        dx = ((ps[..., :, 1:] - ps[..., :, :-1]) - (gs[..., :, 1:] - gs[..., :, :-1])).abs().mean()
        dy = ((ps[..., 1:, :] - ps[..., :-1, :]) - (gs[..., 1:, :] - gs[..., :-1, :])).abs().mean()
        terms.append(dx + dy)
    return torch.stack(terms).mean()
