"""Load whatever checkpoint a user holds: a d3 folder (local or a hub id) or the authors' `.pth` release.

Above both `d3.predictor` (the checkpoint format) and `d3.convert` (the authors' release), so neither imports the
other's caller: infer.py, evaluate.py and D3Pipeline come through here.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from .convert import load_official_predictor
from .checkpoint import OFFICIAL_PROCESSING_RES, PROMPTS, resolve_checkpoint
from .predictor import D3Predictor


def load_predictor(
    checkpoint: str | Path,
    *,
    device=None,
    dtype=None,
    task: str | None = None,
    pretrained_model_name_or_path: str | Path | None = None,
    official_preprocess: bool = False,
) -> D3Predictor:
    """Whatever checkpoint a user holds: our folder (local or a hub id), or the authors' `.pth` release.

    The release is converted on load (`d3.convert`); it needs the SD 2.1 base (`pretrained_model_name_or_path`) for
    the VAE and the prompt embedding. `official_preprocess` switches the defaults to the authors' inference: a
    768x768 squash with plain bilinear resizing both ways. Their prompt and channel mean are what every d3 model
    uses anyway; one difference remains: they *sample* the VAE posterior, d3 takes its mean (deterministic).
    """
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        predictor = load_official_predictor(path, pretrained_model_name_or_path, task=task, device=device,
                                            dtype=dtype)
    else:
        predictor = D3Predictor.from_pretrained(path, device=device, dtype=dtype, task=task)
    if official_preprocess:
        predictor.config = dataclasses.replace(predictor.config, resize_mode="squash",
                                               processing_res=OFFICIAL_PROCESSING_RES)
        if predictor.config.prompt and predictor.config.prompt != PROMPTS[predictor.task]:
            warnings.warn(f"{path}: trained with its own prompt {predictor.config.prompt!r}; its embedding is kept "
                          "(the official prompt cannot be re-embedded without the text encoder)", stacklevel=2)
    return predictor
