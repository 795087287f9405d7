"""The validation's pictures: per set one image, a row per pictured sample: input | prediction | ground truth |
error. Depth is colour-mapped as infer.py writes `_depth_colored.png` (Spectral, near = red; the ground truth scaled
to its own valid range), normals as infer.py's RGB, mattes and masks grey; the error map (inferno, black where the
ground truth is invalid) shows the depth's AbsRel after the benchmark's alignment (0 to 0.5), the normals' angle
(0 to 45 degrees), the matte's absolute difference (0 to 0.5) or the mask's wrong pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d3 import metrics as M
from d3.data.benchmarks import Benchmark
from d3.io import save_png
from d3.outputs import colorize_depth, normal_to_rgb
from d3.prediction_files import conform_prediction
from d3.scorers import make_scorer

ROW_HEIGHT = 192  # pixels per pictured sample (each panel is resized to it, aspect kept)


def heat(values: np.ndarray, top: float, valid: np.ndarray) -> np.ndarray:
    """0..top as the inferno colour map; black outside `valid`."""
    import matplotlib

    rgb = (matplotlib.colormaps["inferno"](np.clip(values / top, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def grey(unit: np.ndarray) -> np.ndarray:
    g = (np.clip(unit, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def panels(task: str, bench: Benchmark, pred: np.ndarray, sample) -> list[np.ndarray]:
    """[input, prediction, ground truth, error] as uint8 RGB, each at the ground truth's size."""
    gt, valid = sample.gt, sample.valid.astype(bool)
    if task == "depth":
        scorer = make_scorer(bench, "cpu")
        aligned, _, _ = M.align_depth(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(valid),
                                      scorer.alignment, scorer.max_res, bench.min_depth, bench.max_depth)
        aligned = aligned.numpy()
        shown = np.zeros_like(gt, dtype=np.float32)
        if valid.any():
            lo, hi = float(gt[valid].min()), float(gt[valid].max())
            shown = (gt - lo) / max(hi - lo, 1e-6)
        gt_rgb = colorize_depth(shown)
        gt_rgb[~valid] = 0
        err = np.abs(aligned - gt) / np.where(valid, np.maximum(gt, 1e-6), 1)
        return [sample.rgb, colorize_depth(pred), gt_rgb, heat(err, 0.5, valid)]
    if task == "normal":
        cos = (pred * gt).sum(-1) / np.maximum(np.linalg.norm(pred, axis=-1) * np.linalg.norm(gt, axis=-1), 1e-8)
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        gt_rgb = normal_to_rgb(gt)
        gt_rgb[~valid] = 0
        return [sample.rgb, normal_to_rgb(pred), gt_rgb, heat(angle, 45.0, valid)]
    if task == "matting":
        return [sample.rgb, grey(pred), grey(gt), heat(np.abs(pred - gt), 0.5, valid)]
    wrong = (pred > 0.5) != gt.astype(bool)
    return [sample.rgb, grey(pred), grey(gt.astype(np.float32)), heat(wrong.astype(np.float32), 1.0, valid)]


def _resized(image: np.ndarray, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def picture_of_set(predictor, bench: Benchmark, count: int) -> np.ndarray | None:
    """The first `count` samples of the set (the same ones every validation), predicted as the scoring does (one
    image per call, the predictor's own geometry); a sample that cannot be read is left out. None: none could."""
    rows = []
    for index in range(min(count, len(bench))):
        try:
            sample = bench[index]
        except (OSError, ValueError):
            continue
        raw = predictor.predict([sample.rgb], batch_size=1)[0]
        pred = conform_prediction(raw, bench.task, sample.gt.shape[:2], f"{bench.name} sample {sample.name}")
        pred = np.nan_to_num(pred.astype(np.float32))
        rows.append(np.concatenate([_resized(p, ROW_HEIGHT) for p in panels(bench.task, bench, pred, sample)], 1))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], 0)


def log_pictures(accelerator, path: Path, tag: str, image: np.ndarray | None, step: int) -> None:
    """The picture as a PNG at `path` (atomically) and in the run's tensorboard and wandb trackers."""
    if image is None:
        return
    save_png(path, image)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
