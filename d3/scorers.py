"""Per-sample scoring for each task: check the prediction, align / clip (depth), compute `d3.metrics`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from d3 import metrics as M
from d3.data.benchmarks import Benchmark, BenchmarkSample, DepthBenchmark
from d3.flags import PROTOCOL  # sentinel: the dataset's own alignment_max_res / Marigold processing resolution


class Scorer:
    keys: Sequence[str] = ()
    extra_columns: Sequence[str] = ()

    def __init__(self, bench: Benchmark, device: torch.device) -> None:
        self.bench, self.device = bench, device

    def score(self, pred: np.ndarray, sample: BenchmarkSample) -> dict[str, float]:
        raise NotImplementedError

    def score_and_pool(self, pred: np.ndarray, sample: BenchmarkSample) -> tuple[dict[str, float], Any]:
        """The sample's row and what :meth:`summarize` pools over the set besides the rows (None: nothing)."""
        return self.score(pred, sample), None

    def summarize(self, rows: list[dict[str, float]], pooled: Sequence[Any] = ()) -> dict[str, float]:
        """The set's numbers from its rows and pooled parts, both in dataset order."""
        return M.mean_over_samples(rows, self.keys)

    def protocol(self) -> dict[str, Any]:
        return {"aggregation": "mean over images (equal weight)"}


class DepthScorer(Scorer):
    keys = M.DEPTH_METRICS
    extra_columns = ("scale", "shift")

    def __init__(self, bench: DepthBenchmark, device, alignment: str | None = None,
                 alignment_max_res: Any = PROTOCOL) -> None:
        super().__init__(bench, device)
        self.alignment = alignment or bench.alignment
        if self.alignment not in M.ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; expected one of {M.ALIGNMENTS}")
        self.max_res = bench.alignment_max_res if alignment_max_res == PROTOCOL else (alignment_max_res or None)

    def score(self, pred, sample):
        p = torch.from_numpy(pred).to(self.device)
        g = torch.from_numpy(sample.gt).to(self.device)
        m = torch.from_numpy(sample.valid).to(self.device)
        aligned, s, b = M.align_depth(p, g, m, self.alignment, self.max_res,
                                      self.bench.min_depth, self.bench.max_depth)
        row = {k: float(v) for k, v in M.depth_metrics(aligned, g, m).items()}
        row.update(scale=s, shift=b)
        return row

    def protocol(self):
        return {**super().protocol(), "alignment": self.alignment, "alignment_max_res": self.max_res,
                "clip": [self.bench.min_depth, self.bench.max_depth]}


class NormalScorer(Scorer):
    keys = M.NORMAL_METRICS

    def __init__(self, bench, device, pooling: str = "image") -> None:
        super().__init__(bench, device)
        if pooling not in ("image", "pixel"):
            raise ValueError(f"unknown pooling {pooling!r}; expected 'image' or 'pixel'")
        self.pooling = pooling

    def score_and_pool(self, pred, sample):
        e = M.angular_errors(torch.from_numpy(pred).to(self.device),
                             torch.from_numpy(sample.gt).to(self.device),
                             torch.from_numpy(sample.valid).to(self.device)).cpu().numpy()
        return M.normal_metrics_from_errors(e, decimals=4), (e if self.pooling == "pixel" else None)

    def score(self, pred, sample):
        return self.score_and_pool(pred, sample)[0]

    def summarize(self, rows, pooled=()):
        if self.pooling == "image":
            return super().summarize(rows)
        return M.normal_metrics_from_errors(np.concatenate(list(pooled)), decimals=None)

    def protocol(self):
        agg = ("per image (values rounded to 4 decimals), mean over images (Marigold)" if self.pooling == "image"
               else "all valid pixels of the dataset pooled (DSINE)")
        return {"pooling": self.pooling, "aggregation": agg, "units": "degrees; thresholds in %"}


class MattingScorer(Scorer):
    keys = M.MATTING_METRICS + M.MATTING_TRIMAP_METRICS

    def score(self, pred, sample):
        return M.matting_metrics(pred, sample.gt, sample.trimap)

    def protocol(self):
        return {**super().protocol(), "units": "SAD and Conn /1000, Grad /10, MSE and MAD raw fractions"}


class SegmentationScorer(Scorer):
    keys = M.SEGMENTATION_METRICS

    def score(self, pred, sample):
        return M.segmentation_metrics(torch.from_numpy(pred).to(self.device),
                                      torch.from_numpy(sample.gt).to(self.device))


def make_scorer(bench: Benchmark, device, alignment=None, alignment_max_res=PROTOCOL, pooling="image") -> Scorer:
    if bench.task == "depth":
        return DepthScorer(bench, device, alignment, alignment_max_res)  # type: ignore[arg-type]
    if bench.task == "normal":
        return NormalScorer(bench, device, pooling)
    if bench.task == "matting":
        return MattingScorer(bench, device)
    return SegmentationScorer(bench, device)


# ----------------------------------------------------------------------------------------------
# Checkpoint mode
# ----------------------------------------------------------------------------------------------
