"""Evaluation metrics: depth, surface normals, matting, segmentation (docs/protocols.md: "Depth metrics",
"Normal benchmarks and metrics", "Matting (P3M-500-NP)", "Few-shot segmentation").

Every function reproduces the reference implementation it names, including its quirks, so that
numbers are comparable with published tables:

* depth   -- Marigold ``eval.py`` / ``metric.py`` / ``alignment.py`` (per-image, float32, masked
  means; least-squares scale & shift fitted in float64; the width-only ``alignment_max_res``
  subsampling, see docs/protocols.md, "Depth metrics").
* normals -- Marigold-Normals (per-image values rounded to 4 decimals, then averaged over images)
  or, with ``pooling="pixel"``, DSINE / E2E-FT (all valid pixels of the dataset pooled).
* matting -- P3M ``core/evaluate.py`` (float64 NumPy / SciPy, exactly its formulas and divisors).
* segmentation -- binary IoU, pixel accuracy and Dice per image (see :func:`segmentation_metrics`).

Depth and normal errors are computed with torch and run on the GPU when given CUDA tensors;
matting stays on NumPy/SciPy because P3M's Grad and Conn are defined by SciPy's filters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .flags import ALIGNMENTS  # noqa: F401  (evaluate.py's --alignment choices)

ArrayLike = Union[np.ndarray, torch.Tensor]

DEPTH_METRICS: tuple[str, ...] = (
    "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog",
)
NORMAL_METRICS: tuple[str, ...] = ("mean", "median", "rmse", "a5", "a7_5", "a11_25", "a22_5", "a30")
NORMAL_THRESHOLDS: dict[str, float] = {"a5": 5.0, "a7_5": 7.5, "a11_25": 11.25, "a22_5": 22.5, "a30": 30.0}
MATTING_METRICS: tuple[str, ...] = ("sad", "mse", "mad", "grad", "conn")
MATTING_TRIMAP_METRICS: tuple[str, ...] = ("sad_trimap", "mse_trimap", "mad_trimap", "sad_fg", "sad_bg")
SEGMENTATION_METRICS: tuple[str, ...] = ("iou", "pixel_acc", "dice")


def as_tensor(x: ArrayLike, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """NumPy or torch in, torch out (no copy when nothing changes)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)


# ----------------------------------------------------------------------------------------------
# Depth: alignment (docs/protocols.md, "Depth metrics", steps 1-2)
# ----------------------------------------------------------------------------------------------

def marigold_max_res_columns(height: int, width: int, max_res: int | None) -> torch.Tensor | None:
    """Column indices kept by Marigold's ``alignment_max_res`` subsampling, or None if no-op.

    Marigold passes [1, H, W] arrays through ``torch.nn.Upsample(scale_factor=f, mode="nearest")``
    with f = min(R/H, R/W). A 3-D tensor is read as (N, C, L), so only the last axis (the width)
    is resampled and all rows are kept. We let torch compute the nearest indices the same way
    (same op, same scale factor) on an index ramp, then gather those columns on any device.
    """
    if not max_res:
        return None
    f = float(np.min(max_res / np.array([height, width], dtype=np.float64)))
    if f >= 1:
        return None
    ramp = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    return F.interpolate(ramp, scale_factor=f, mode="nearest").view(-1).long()


def lstsq_scale_shift(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """argmin_{s,b} sum_M (s*pred + b - gt)^2 in float64, like ``numpy.linalg.lstsq``.

    Closed form on centred sums; a constant prediction gets lstsq's minimum-norm solution.
    """
    p = pred[mask].double()
    g = gt[mask].double()
    if p.numel() == 0:
        raise ValueError("least-squares alignment: the valid mask is empty")
    if bool(p.min() == p.max()):
        c = float(p[0])
        gm = float(g.mean())
        return gm * c / (c * c + 1.0), gm / (c * c + 1.0)
    pm, gm = p.mean(), g.mean()
    dp = p - pm
    s = (dp * (g - gm)).sum() / (dp * dp).sum()
    b = gm - s * pm
    return float(s), float(b)


def align_least_squares(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike,
                        max_res: int | None = None) -> tuple[torch.Tensor, float, float]:
    """Marigold's ``align_depth_least_square``: fit on (optionally subsampled) masked pixels,
    apply to the full-resolution prediction. s, b are rounded to the prediction's dtype
    (lstsq returns float32 for float32 input) and applied in that dtype.
    Returns (aligned prediction, scale, shift)."""
    pred = as_tensor(pred)
    gt = as_tensor(gt, device=pred.device)
    mask = as_tensor(mask, device=pred.device).bool()
    cols = marigold_max_res_columns(pred.shape[-2], pred.shape[-1], max_res)
    if cols is not None:
        cols = cols.to(pred.device)
        s, b = lstsq_scale_shift(pred[..., cols], gt[..., cols], mask[..., cols])
    else:
        s, b = lstsq_scale_shift(pred, gt, mask)
    s_t = torch.tensor(s, dtype=pred.dtype, device=pred.device)
    b_t = torch.tensor(b, dtype=pred.dtype, device=pred.device)
    return pred * s_t + b_t, float(s_t), float(b_t)


def depth_to_disparity(depth: torch.Tensor) -> torch.Tensor:
    """1/d where d > 0, else 0 (Marigold ``depth2disparity``; it is its own inverse)."""
    pos = depth > 0
    return torch.where(pos, 1.0 / torch.where(pos, depth, torch.ones_like(depth)), torch.zeros_like(depth))


def align_depth(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike, alignment: str = "least_square",
                max_res: int | None = None, min_depth: float = 1e-6, max_depth: float = math.inf,
                ) -> tuple[torch.Tensor, float, float]:
    """Steps 1-3 of docs/protocols.md, "Depth metrics": align, then clip to [min_depth, max_depth], then to >= 1e-6.

    ``least_square_disparity``: GT -> disparity, mask &= gt > 0 & pred > 0, fit the prediction
    (read as disparity) to it, clip disparity >= 1e-3, invert. ``none`` skips alignment (metric
    predictions). Returns (clipped depth, scale, shift)."""
    pred = as_tensor(pred)
    gt = as_tensor(gt, device=pred.device)
    mask = as_tensor(mask, device=pred.device).bool()
    if alignment == "least_square":
        out, s, b = align_least_squares(pred, gt, mask, max_res)
    elif alignment == "least_square_disparity":
        gt_disp = depth_to_disparity(gt)
        m = mask & (gt > 0) & (pred > 0)
        disp, s, b = align_least_squares(pred, gt_disp, m, max_res)
        out = depth_to_disparity(disp.clamp_min(1e-3))
    elif alignment == "none":
        out, s, b = pred, 1.0, 0.0
    else:
        raise ValueError(f"unknown alignment {alignment!r}; expected one of {ALIGNMENTS}")
    return out.clamp(min_depth, max_depth).clamp_min(1e-6), s, b


# ----------------------------------------------------------------------------------------------
# Depth: metrics (docs/protocols.md, "Depth metrics", step 4)
# ----------------------------------------------------------------------------------------------

def depth_metrics(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike) -> dict[str, torch.Tensor]:
    """The ten Marigold depth metrics per image, over the last two axes ([..., H, W] in, [...] out).

    Invalid terms are zeroed and sums divided by the mask count, in the prediction's dtype.
    ``silog`` = 100 * sqrt(mean(d^2) - mean(d)^2), d = ln p - ln g (full variance). The variance
    is clamped at 0 so that a float-rounding negative gives 0 instead of Marigold's NaN.
    ``delta_k`` counts max(p/g, g/p) < 1.25^k (strict). Nothing is aligned or clipped here.
    """
    p = as_tensor(pred)
    g = as_tensor(gt, device=p.device, dtype=p.dtype)
    m = as_tensor(mask, device=p.device).bool()
    n = m.sum((-1, -2))
    invalid = ~m

    def mmean(x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(invalid, 0).sum((-1, -2)) / n

    diff = p - g
    log_diff = torch.log(p) - torch.log(g)
    ratio = torch.maximum(p / g, g / p)
    out = {
        "abs_rel": mmean(diff.abs() / g),
        "sq_rel": mmean(diff.abs().pow(2) / g),
        "rmse": mmean(diff.pow(2)).sqrt(),
        "rmse_log": mmean(log_diff.pow(2)).sqrt(),
        "log10": mmean((torch.log10(p) - torch.log10(g)).abs()),
        "delta1": mmean((ratio < 1.25).to(p.dtype)),
        "delta2": mmean((ratio < 1.25 ** 2).to(p.dtype)),
        "delta3": mmean((ratio < 1.25 ** 3).to(p.dtype)),
        "i_rmse": mmean((1.0 / p - 1.0 / g).pow(2)).sqrt(),
        "silog": (mmean(log_diff.pow(2)) - mmean(log_diff).pow(2)).clamp_min(0).sqrt() * 100,
    }
    return out


# ----------------------------------------------------------------------------------------------
# Surface normals (docs/protocols.md, "Normal benchmarks and metrics")
# ----------------------------------------------------------------------------------------------

def normal_valid_mask(gt: ArrayLike) -> torch.Tensor:
    """Valid GT pixels: ||n_gt|| > 0 (invalid pixels are stored as zero vectors). gt is HxWx3."""
    return torch.linalg.vector_norm(as_tensor(gt).float(), dim=-1) > 0


def angular_errors(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> torch.Tensor:
    """Angles in degrees between prediction and GT at the valid pixels (1-D, float32).

    Both are HxWx3; as Marigold, channels-first [3, N] cosine similarity (eps 1e-8, so
    non-unit predictions are fine), clamped to [-1, 1], acos, degrees. ``mask`` defaults to
    ||gt|| > 0."""
    g = as_tensor(gt).float()
    p = as_tensor(pred, device=g.device).float()
    m = normal_valid_mask(g) if mask is None else as_tensor(mask, device=g.device).bool()
    pc, gc = p.permute(2, 0, 1)[:, m], g.permute(2, 0, 1)[:, m]
    cos = torch.cosine_similarity(pc, gc, dim=0, eps=1e-8).clamp(-1.0, 1.0)
    return torch.acos(cos) * 180.0 / np.pi


def normal_metrics_from_errors(errors: ArrayLike, decimals: int | None = 4) -> dict[str, float]:
    """mean, median, rmse (degrees) and % of errors strictly below 5/7.5/11.25/22.5/30 degrees.

    NumPy on the float32 errors exactly as Marigold (np.average, np.median) and DSINE; Marigold
    rounds each per-image value to 4 decimals (``decimals=4``); DSINE's pooled numbers are not
    rounded (``decimals=None``)."""
    e = errors.detach().cpu().numpy() if isinstance(errors, torch.Tensor) else np.asarray(errors)
    n = e.shape[0]
    if n == 0:
        raise ValueError("normal metrics: no valid pixels")
    vals = {
        "mean": np.average(e),
        "median": np.median(e),
        "rmse": np.sqrt(np.sum(e * e) / n),
    }
    for key, t in NORMAL_THRESHOLDS.items():
        vals[key] = 100.0 * (np.sum(e < t) / n)
    if decimals is not None:
        vals = {k: round(v, decimals) for k, v in vals.items()}
    return {k: float(v) for k, v in vals.items()}


def normal_metrics(pred: ArrayLike, gt: ArrayLike) -> dict[str, float]:
    """Per-image Marigold-Normals metrics for one HxWx3 prediction / GT pair."""
    return normal_metrics_from_errors(angular_errors(pred, gt))


# ----------------------------------------------------------------------------------------------
# Matting (docs/protocols.md, "Matting (P3M-500-NP)") -- P3M's definitions, float64 NumPy
# ----------------------------------------------------------------------------------------------

def _f64(x: ArrayLike) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def matting_sad_mse_mad(pred: ArrayLike, gt: ArrayLike) -> tuple[float, float, float]:
    """Whole image: SAD = sum|P-A| / 1000, MSE = sum (P-A)^2 / HW, MAD = sum|P-A| / HW."""
    p, a = _f64(pred), _f64(gt)
    hw = p.shape[0] * p.shape[1]
    abs_sum = np.sum(np.abs(p - a))
    return float(abs_sum / 1000), float(np.sum((p - a) ** 2) / hw), float(abs_sum / hw)


def matting_trimap_metrics(pred: ArrayLike, gt: ArrayLike, trimap: ArrayLike) -> dict[str, float]:
    """P3M's trimap variants: P is forced to 1 on trimap 255 and to 0 on trimap 0; SAD_T over
    the whole modified image /1000, MSE_T and MAD_T divided by #(trimap == 128); SAD_FG / SAD_BG
    = sum |P-A| of the *unmodified* prediction over trimap 255 / 0, /1000."""
    p, a = _f64(pred), _f64(gt)
    t = np.asarray(trimap)
    err = np.abs(p - a)
    sad_fg = float(np.sum(err * (t == 255)) / 1000)
    sad_bg = float(np.sum(err * (t == 0)) / 1000)
    q = p.copy()
    q[t == 255] = 1.0
    q[t == 0] = 0.0
    unknown = float((t == 128).sum())
    if unknown == 0:  # P3M's fallback: every pixel that is neither 0 nor 255
        unknown = t.shape[0] * t.shape[1] - float((t == 255).sum()) - float((t == 0).sum())
    d = q - a
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sad_trimap": float(np.sum(np.abs(d)) / 1000),
            "mse_trimap": float(np.sum(d ** 2) / unknown) if unknown else math.nan,
            "mad_trimap": float(np.sum(np.abs(d)) / unknown) if unknown else math.nan,
            "sad_fg": sad_fg,
            "sad_bg": sad_bg,
        }


def matting_grad(pred: ArrayLike, gt: ArrayLike) -> float:
    """sum (|grad_s P| - |grad_s A|)^2 / 10 with first-order Gaussian derivatives (sigma 1.4,
    SciPy defaults: truncate 4, reflect), filtered into float32 as P3M does."""
    from scipy.ndimage import gaussian_filter

    def magnitude(x: np.ndarray) -> np.ndarray:
        dx = gaussian_filter(x, sigma=1.4, order=[1, 0], output=np.float32)
        dy = gaussian_filter(x, sigma=1.4, order=[0, 1], output=np.float32)
        return np.sqrt(dx ** 2 + dy ** 2)

    return float(np.sum(np.square(magnitude(_f64(pred)) - magnitude(_f64(gt)))) / 10)


def largest_component(binary: np.ndarray) -> np.ndarray | None:
    """Largest 4-connected component of a boolean image (ties: first in raster order)."""
    from scipy import ndimage

    labels, count = ndimage.label(binary)  # default 2-D structure = 4-connectivity (cross)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def matting_conn(pred: ArrayLike, gt: ArrayLike, step: float = 0.1) -> float:
    """P3M's connectivity error: thresholds arange(0, 1.1, step); for each level the largest
    4-connected component of (P >= t) & (A >= t); pixels first falling outside it get the
    previous level; never-dropped pixels get 1; phi = 1 - d * [d >= 0.15]; sum|phi_P - phi_A| /1000."""
    p, a = _f64(pred), _f64(gt)
    thresholds = np.arange(0, 1.1, step)
    level = np.full(p.shape, -1, dtype=np.float32)
    for i in range(1, thresholds.size):
        omega = largest_component((p >= thresholds[i]) & (a >= thresholds[i]))
        if omega is None:
            continue
        level[(level == -1) & ~omega] = thresholds[i - 1]
    level[level == -1] = 1
    d_p, d_a = p - level, a - level
    phi_p = 1 - d_p * (d_p >= 0.15).astype(np.float32)
    phi_a = 1 - d_a * (d_a >= 0.15).astype(np.float32)
    return float(np.sum(np.abs(phi_p - phi_a)) / 1000)


def matting_metrics(pred: ArrayLike, gt: ArrayLike, trimap: ArrayLike | None = None) -> dict[str, float]:
    """All P3M metrics for one alpha pair (float, [0, 1], original resolution)."""
    sad, mse, mad = matting_sad_mse_mad(pred, gt)
    out = {"sad": sad, "mse": mse, "mad": mad, "grad": matting_grad(pred, gt), "conn": matting_conn(pred, gt)}
    if trimap is not None:
        out.update(matting_trimap_metrics(pred, gt, trimap))
    return out


# ----------------------------------------------------------------------------------------------
# Segmentation (paper Tables 4, 10-29)
# ----------------------------------------------------------------------------------------------

def segmentation_metrics(pred: ArrayLike, gt: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Binary foreground metrics for one image.

    ``pred`` is a score map in [0, 1] (foreground = pred > threshold) or a boolean mask; ``gt``
    a boolean mask. iou = TP/(TP+FP+FN), dice = 2TP/(2TP+FP+FN), pixel_acc = (TP+TN)/HW. When
    both masks are empty, iou = dice = 1 (a perfect empty prediction)."""
    g = as_tensor(gt).bool()
    p = as_tensor(pred, device=g.device)
    p = p if p.dtype == torch.bool else p > threshold
    tp = (p & g).sum().item()
    fp = (p & ~g).sum().item()
    fn = (~p & g).sum().item()
    total = g.numel()
    tn = total - tp - fp - fn
    union = tp + fp + fn
    return {
        "iou": tp / union if union else 1.0,
        "pixel_acc": (tp + tn) / total,
        "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
    }


def mean_over_samples(rows: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Equal-weight mean over images (Marigold's MetricTracker / P3M's sum / N)."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out
