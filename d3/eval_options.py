"""What an evaluation run is told: :class:`EvalOptions`, the options of :func:`d3.evaluation.run`.

``evaluate.py`` builds them from its flags in one place; a program builds them directly, and every field defaults
to what the flag does. Light (no torch), so the entry point may import it before its flags are checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

from d3.flags import PROTOCOL

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class EvalOptions:
    """The predictions to score, where the results go, how a checkpoint predicts and how the scores are made.

    Give exactly one of ``checkpoint`` and ``predictions``, unless :func:`d3.evaluation.run` is handed a loaded
    ``predictor`` (then ``checkpoint``, if given, only names it in summary.json). ``PROTOCOL`` (the string
    ``"protocol"``) asks for the benchmark's own value where a field allows it."""

    # what is scored
    checkpoint: str | None = None  # a d3 folder, hub id or the authors' .pth, predicted in memory
    predictions: PathLike | None = None  # a folder of saved predictions (for a group: one sub-folder per dataset)
    split: PathLike | None = None  # a filename list (column 0: the RGB path); None: discover; single datasets only
    # where the results go
    output: PathLike | None = None  # per_sample.csv and summary.json; None: eval_results/<dataset> (run)
    save_predictions: PathLike | None = None  # checkpoint only: also write its predictions here (.npy)
    # how a checkpoint predicts
    processing_res: int | str | None = None  # pixels (0: native), PROTOCOL (Marigold's); None: the checkpoint's own
    resize_mode: str | None = None  # squash / keep_aspect; None: squash for a checkpoint, a given predictor's own
    official_preprocess: bool = False  # the authors' 768x768 squash whatever the checkpoint's resolution
    pretrained_model_name_or_path: str | None = None  # the SD 2.1 base for the authors' .pth (VAE, prompt)
    batch_size: int = 1  # images per predictor call
    device: Any = "auto"  # "auto": cuda if present (under torchrun each process's own GPU), else mps, else the CPU
    dtype: str = "auto"  # fp32 / bf16 / fp16; "auto": fp32 on the CPU, bf16 on CUDA (fp16 without bf16), fp16 on mps
    # how the predictions are scored
    alignment: str | None = None  # depth: least_square / least_square_disparity / none; None: the protocol's
    alignment_max_res: int | str = PROTOCOL  # pixels the alignment fit subsamples to (0: all); PROTOCOL: the set's
    pooling: str = "image"  # normals: the mean of per-image means (Marigold) or "pixel", all pixels pooled (DSINE)
    allow_invalid: bool = False  # non-finite values scored as 0, samples without valid GT skipped; False: stop
    progress: bool = True  # a progress bar (rank 0 only)
