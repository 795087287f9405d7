"""Reading a method's prediction files for a benchmark (``evaluate.py --predictions DIR``).

Prediction files (``--predictions DIR``) are looked up, in this order (``REL`` = the RGB path relative to the
data root without its extension), as
  1. infer.py's output for the dataset folder, its lossless file: ``DIR/REL_depth.npy``, ``DIR/REL_normal.npy``,
     ``DIR/REL_alpha_16bit.png`` (matting and segmentation);
  2. plain names: ``DIR/REL.npy`` (matting / segmentation also ``.png``);
  3. the reference tool's naming: Marigold depth ``DIR/<rgb dir>/pred_<...>.npy`` (NYU
     ``rgb_0001.png -> pred_0001.npy``, the others ``X.ext -> pred_X.npy``); Marigold normals
     ``DIR/<rgb dir>/<rgb stem>.npy`` (the plain name);
  4. infer.py's 8-bit ``DIR/REL_alpha.png`` (matting and segmentation);
and for matting / segmentation the same names flat, by image stem (P3M's own layout, or infer.py run on the image
folder). A file that is the sample's own GT is refused (``--predictions`` pointed at the data).
Depth: float HxW or 1xHxW at GT resolution (never resized). Normals: (H,W,3) or (3,H,W), camera frame
x right, y up, z toward the camera. Alpha / masks: HxW ``.npy`` in [0, 1] or an 8/16-bit PNG
(a 3-channel map is reduced by its channel mean).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from d3.data.benchmarks import Benchmark, DepthBenchmark, decode_png_unit


class EvaluationError(RuntimeError):
    """A problem with one sample's prediction; the message names the sample."""


# ----------------------------------------------------------------------------------------------
# Prediction files
# ----------------------------------------------------------------------------------------------

def marigold_pred_name(rgb_basename: str, name_mode: str) -> str:
    """Marigold's ``get_pred_name`` with suffix .npy (``rgb_id`` for NYU, ``id`` elsewhere)."""
    if name_mode == "rgb_id":
        name = "pred_" + rgb_basename.split("_")[1]
    elif name_mode == "id":
        name = "pred_" + rgb_basename
    else:
        raise ValueError(f"unknown name mode {name_mode!r}")
    return os.path.splitext(name)[0] + ".npy"


# What infer.py writes per image (d3/outputs.py), lossless first; the 8-bit alpha only after every other name.
INFER_SUFFIXES = {"depth": ("_depth.npy",), "normal": ("_normal.npy",), "matting": ("_alpha_16bit.png",),
                  "segmentation": ("_alpha_16bit.png",)}
INFER_LOSSY_SUFFIXES = {"matting": ("_alpha.png",), "segmentation": ("_alpha.png",)}


def prediction_candidates(bench: Benchmark, rgb_rel: str) -> list[str]:
    """Relative paths under the prediction folder, in lookup order: infer.py's lossless file, the plain names,
    Marigold's depth naming, then (matting / segmentation) infer.py's 8-bit alpha; matting and segmentation also
    flat (by image stem) after the mirrored paths."""
    p = PurePosixPath(rgb_rel)
    exts = (".npy", ".png") if bench.task in ("matting", "segmentation") else (".npy",)

    def names(stem: str) -> list[str]:
        return ([stem + s for s in INFER_SUFFIXES[bench.task]] + [stem + e for e in exts]
                + [stem + s for s in INFER_LOSSY_SUFFIXES.get(bench.task, ())])

    out = names(str(p.with_suffix("")))
    if isinstance(bench, DepthBenchmark):
        out.append(str(p.parent / marigold_pred_name(p.name, bench.pred_name_mode)))
    elif bench.task in ("matting", "segmentation"):
        out += names(p.stem)
    return list(dict.fromkeys(x[2:] if x.startswith("./") else x for x in out))


def find_prediction(pred_dir: Path, bench: Benchmark, rgb_rel: str, gt_rel: str | None = None) -> Path:
    """The first candidate present. A candidate that is the sample's own GT file (``--predictions`` pointed at the
    data folder, where DIODE's ``X_depth.npy`` and the normal sets' ``X_normal.npy`` are GT) is an error."""
    cands = prediction_candidates(bench, rgb_rel)
    gt_file = None
    if gt_rel and bench.root.is_dir():  # (a .tar holds no file a prediction path could be)
        gt_file = (bench.root / gt_rel).resolve()
    for rel in cands:
        if (pred_dir / rel).is_file():
            if gt_file is not None and (pred_dir / rel).resolve() == gt_file:
                raise EvaluationError(f"{bench.name} sample {rgb_rel}: {pred_dir / rel} is the ground truth itself; "
                                      "--predictions must be a folder of predictions, not the dataset")
            return pred_dir / rel
    raise EvaluationError(f"{bench.name} sample {rgb_rel}: prediction missing; looked for "
                          + ", ".join(str(pred_dir / c) for c in cands))


def read_prediction_file(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() == ".png":
        return decode_png_unit(path.read_bytes())
    raise EvaluationError(f"{path}: unsupported prediction format (expected .npy or .png)")


def read_prediction(pred_dir: Path, bench: Benchmark, rgb_rel: str, gt_rel: str | None = None) -> np.ndarray:
    path = find_prediction(pred_dir, bench, rgb_rel, gt_rel)
    try:
        return read_prediction_file(path)
    except EvaluationError:
        raise
    except Exception as e:  # a truncated .npy, a pickled object array, a file that is not a PNG
        raise EvaluationError(f"{bench.name} sample {rgb_rel}: cannot read prediction {path} "
                              f"({type(e).__name__}: {e})") from e


def conform_prediction(arr: Any, task: str, shape_hw: Sequence[int], what: str) -> np.ndarray:
    """Bring a raw prediction to the task's layout at the GT resolution, or raise naming ``what``.

    depth HxW float32 | normals HxWx3 float32 | alpha / mask HxW float64. Nothing is resized."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().float().cpu().numpy()
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.number):
        raise EvaluationError(f"{what}: prediction has non-numeric dtype {a.dtype}")
    h, w = int(shape_hw[0]), int(shape_hw[1])
    shape = a.shape
    if task == "normal":
        if a.shape == (h, w, 3):
            pass
        elif a.shape == (3, h, w):
            a = a.transpose(1, 2, 0)
        elif a.shape == (1, 3, h, w):
            a = a[0].transpose(1, 2, 0)
        else:
            raise EvaluationError(f"{what}: prediction has shape {shape}, expected ({h}, {w}, 3) or (3, {h}, {w})")
        return np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] == 3 and task != "depth":
        a = a.astype(np.float64).mean(-1)
    if a.shape != (h, w):
        raise EvaluationError(f"{what}: prediction has shape {shape}, expected ({h}, {w}) "
                              f"(predictions must be at GT resolution; they are never resized)")
    return np.ascontiguousarray(a, dtype=np.float32 if task == "depth" else np.float64)


# ----------------------------------------------------------------------------------------------
# Per-task scoring
# ----------------------------------------------------------------------------------------------
