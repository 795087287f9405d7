"""The ``--checkpoint`` predictor as evaluation uses it: loaded in the paper's geometry, its outputs one per image,
and that geometry in summary.json's words. The model code loads only when :func:`load_predictor` is called."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from d3.prediction_files import EvaluationError

EVAL_RESIZE_MODE = "squash"  # the paper's protocol: the authors' square network input (see load_predictor)


def load_predictor(checkpoint: str, device: torch.device, pretrained_model_name_or_path: str | None = None,
                   official_preprocess: bool = False, resize_mode: str | None = None, dtype: str | None = None):
    """A d3 folder (or its hub id) or the authors' .pth, which needs the SD 2.1 base for its VAE and prompt.

    Set up for the paper's protocol by default: ``resize_mode`` (default ``squash``) replaces the checkpoint's own.
    The authors train on squashed squares and predict on a squash of the whole image (their inference script: a
    768x768 bilinear resize without antialiasing, and back the same way), and their tables come from such
    predictions; ``squash`` does that at the checkpoint's processing resolution (768 for the paper's models and for
    the authors' .pth). ``keep_aspect`` is ``infer.py``'s default geometry (long side to the processing resolution,
    padded). ``official_preprocess`` also fixes the resolution at 768 whatever the checkpoint says. ``dtype``:
    fp32 / bf16 / fp16, or None / "auto" for the device's default (fp32 on the CPU, bf16 on CUDA)."""

    from d3.checkpoint import RESIZE_MODES
    from d3.loading import (
        load_predictor as load,  # only the --checkpoint path needs the model code
    )

    mode = resize_mode or EVAL_RESIZE_MODE
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if official_preprocess and mode != "squash":
        raise ValueError("official_preprocess squashes to a square; it cannot be combined with resize mode " + mode)
    predictor = load(checkpoint, device=device, dtype=None if dtype == "auto" else dtype,
                     pretrained_model_name_or_path=pretrained_model_name_or_path,
                     official_preprocess=official_preprocess)
    predictor.config = dataclasses.replace(predictor.config, resize_mode=mode)
    return predictor


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_record(predictor, device) -> dict[str, Any]:
    """summary.json's record of where and in which precision the predictions were made (the same checkpoint scores
    differently in bf16 on a GPU and in fp32 on the CPU, in the third decimal); saved predictions: unknown."""
    if predictor is None:
        return {"device": None, "dtype": None}
    dtype = getattr(predictor, "dtype", None)
    return {"device": str(getattr(predictor, "device", device)),
            "dtype": DTYPE_NAMES.get(dtype, None if dtype is None else str(dtype))}


def predictor_resize_mode(predictor) -> str | None:
    config = getattr(predictor, "config", None)
    mode = config.get("resize_mode") if isinstance(config, dict) else getattr(config, "resize_mode", None)
    return mode if mode is not None else getattr(predictor, "resize_mode", None)


def describe_geometry(resize_mode: str | None, processing_res: int | None) -> str:
    """summary.json's words for the network input geometry of --checkpoint."""
    if not processing_res:
        return "native resolution (padded to the network's size multiple), no resizing"
    if resize_mode == "squash":
        return (f"squashed to {processing_res}x{processing_res} (aspect ratio not kept), bilinear without "
                "antialiasing, predicted back to the original size the same way (the authors' inference)")
    if resize_mode == "keep_aspect":
        return (f"long side resized to {processing_res} (aspect ratio kept, antialiased when shrinking), padded to "
                "the network's size multiple, cropped and resized back to the original size")
    return f"the predictor's own at processing resolution {processing_res}"


def predictor_default_res(predictor) -> int | None:
    for obj in (predictor, getattr(predictor, "config", None)):
        if obj is None:
            continue
        val = obj.get("processing_res") if isinstance(obj, dict) else getattr(obj, "processing_res", None)
        if val is not None:
            return int(val)
    return None


def outputs_per_image(out: Any, n: int) -> list[Any]:
    """The predictor's output for n images as n items: a list, or an array batched on dim 0."""
    if isinstance(out, (list, tuple)):
        items = list(out)
    elif isinstance(out, (np.ndarray, torch.Tensor)) and out.ndim >= 3 and out.shape[0] == n:
        items = [out[i] for i in range(n)]
    elif n == 1:
        items = [out]
    else:
        raise EvaluationError(f"predictor returned {type(out).__name__} for a batch of {n} images")
    if len(items) != n:
        raise EvaluationError(f"predictor returned {len(items)} outputs for {n} images")
    return items
