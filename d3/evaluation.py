"""The scoring loop behind ``evaluate.py``, shared by ``--predictions`` and ``--checkpoint``.

Per sample: get the prediction (a file, or the one-step predictor in memory), check its shape and
values, align / clip (depth), compute the metrics of :mod:`d3.metrics`; then average with equal
weight per image and write ``per_sample.csv`` and ``summary.json``. ``--checkpoint`` predicts in the paper's
geometry by default, a squash to the square processing resolution (:func:`load_predictor`); summary.json records it.
Under torchrun each process scores the samples it owns (:mod:`d3.sharding`), and rank 0 aggregates every sample's
:class:`SampleRecord` in dataset order, as one process does.

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

import csv
import json
import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from d3 import metrics as M
from d3.data.benchmarks import (
    BENCHMARKS, GROUPS, Benchmark, BenchmarkSample, DepthBenchmark, decode_png_unit,
)
from d3.devices import resolve_device
from d3.sharding import RankZeroFailed, Shard

PROTOCOL = "protocol"  # sentinel: the dataset's own alignment_max_res / Marigold processing resolution

TASK_METRICS: Dict[str, Sequence[str]] = {
    "depth": M.DEPTH_METRICS,
    "normal": M.NORMAL_METRICS,
    "matting": M.MATTING_METRICS + M.MATTING_TRIMAP_METRICS,
    "segmentation": M.SEGMENTATION_METRICS,
}


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


def prediction_candidates(bench: Benchmark, rgb_rel: str) -> List[str]:
    """Relative paths under the prediction folder, in lookup order: infer.py's lossless file, the plain names,
    Marigold's depth naming, then (matting / segmentation) infer.py's 8-bit alpha; matting and segmentation also
    flat (by image stem) after the mirrored paths."""
    p = PurePosixPath(rgb_rel)
    exts = (".npy", ".png") if bench.task in ("matting", "segmentation") else (".npy",)

    def names(stem: str) -> List[str]:
        return ([stem + s for s in INFER_SUFFIXES[bench.task]] + [stem + e for e in exts]
                + [stem + s for s in INFER_LOSSY_SUFFIXES.get(bench.task, ())])

    out = names(str(p.with_suffix("")))
    if isinstance(bench, DepthBenchmark):
        out.append(str(p.parent / marigold_pred_name(p.name, bench.pred_name_mode)))
    elif bench.task in ("matting", "segmentation"):
        out += names(p.stem)
    return list(dict.fromkeys(x[2:] if x.startswith("./") else x for x in out))


def find_prediction(pred_dir: Path, bench: Benchmark, rgb_rel: str, gt_rel: Optional[str] = None) -> Path:
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


def _read_prediction(pred_dir: Path, bench: Benchmark, rgb_rel: str, gt_rel: Optional[str] = None) -> np.ndarray:
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

class Scorer:
    keys: Sequence[str] = ()
    extra_columns: Sequence[str] = ()

    def __init__(self, bench: Benchmark, device: torch.device) -> None:
        self.bench, self.device = bench, device

    def score(self, pred: np.ndarray, sample: BenchmarkSample) -> Dict[str, float]:
        raise NotImplementedError

    def score_and_pool(self, pred: np.ndarray, sample: BenchmarkSample) -> Tuple[Dict[str, float], Any]:
        """The sample's row and what :meth:`summarize` pools over the set besides the rows (None: nothing)."""
        return self.score(pred, sample), None

    def summarize(self, rows: List[Dict[str, float]], pooled: Sequence[Any] = ()) -> Dict[str, float]:
        """The set's numbers from its rows and pooled parts, both in dataset order."""
        return M.mean_over_samples(rows, self.keys)

    def protocol(self) -> Dict[str, Any]:
        return {"aggregation": "mean over images (equal weight)"}


class DepthScorer(Scorer):
    keys = M.DEPTH_METRICS
    extra_columns = ("scale", "shift")

    def __init__(self, bench: DepthBenchmark, device, alignment: Optional[str] = None,
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

EVAL_RESIZE_MODE = "squash"  # the paper's protocol: the authors' square network input (see load_predictor)


def load_predictor(checkpoint: str, device: torch.device, pretrained_model_name_or_path: Optional[str] = None,
                   official_preprocess: bool = False, resize_mode: Optional[str] = None):
    """A d3 folder (or its hub id) or the authors' .pth, which needs the SD 2.1 base for its VAE and prompt.

    Set up for the paper's protocol by default: ``resize_mode`` (default ``squash``) replaces the checkpoint's own.
    The authors train on squashed squares and predict on a squash of the whole image (their inference script: a
    768x768 bilinear resize without antialiasing, and back the same way), and their tables come from such
    predictions; ``squash`` does that at the checkpoint's processing resolution (768 for the paper's models and for
    the authors' .pth). ``keep_aspect`` is ``infer.py``'s default geometry (long side to the processing resolution,
    padded). ``official_preprocess`` also fixes the resolution at 768 whatever the checkpoint says."""
    import dataclasses

    from d3.checkpoint import RESIZE_MODES
    from d3.loading import load_predictor as load  # only the --checkpoint path needs the model code

    mode = resize_mode or EVAL_RESIZE_MODE
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if official_preprocess and mode != "squash":
        raise ValueError("official_preprocess squashes to a square; it cannot be combined with resize mode " + mode)
    predictor = load(checkpoint, device=device, pretrained_model_name_or_path=pretrained_model_name_or_path,
                     official_preprocess=official_preprocess)
    predictor.config = dataclasses.replace(predictor.config, resize_mode=mode)
    return predictor


def predictor_resize_mode(predictor) -> Optional[str]:
    config = getattr(predictor, "config", None)
    mode = config.get("resize_mode") if isinstance(config, dict) else getattr(config, "resize_mode", None)
    return mode if mode is not None else getattr(predictor, "resize_mode", None)


def describe_geometry(resize_mode: Optional[str], processing_res: Optional[int]) -> str:
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


def predictor_default_res(predictor) -> Optional[int]:
    for obj in (predictor, getattr(predictor, "config", None)):
        if obj is None:
            continue
        val = obj.get("processing_res") if isinstance(obj, dict) else getattr(obj, "processing_res", None)
        if val is not None:
            return int(val)
    return None


def _as_list(out: Any, n: int) -> List[Any]:
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


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class InvalidCounter:
    allow: bool
    samples_with_nonfinite: int = 0
    nonfinite_values: int = 0

    def check(self, pred: np.ndarray, what: str) -> np.ndarray:
        bad = ~np.isfinite(pred)
        nbad = int(bad.sum())
        if nbad == 0:
            return pred
        if not self.allow:
            raise EvaluationError(f"{what}: prediction has {nbad} non-finite values "
                                  f"(use --allow_invalid to score them as 0 and count them)")
        self.samples_with_nonfinite += 1
        self.nonfinite_values += nbad
        pred = pred.copy()
        pred[bad] = 0
        return pred


def _save_prediction(save_dir: Path, rgb_rel: str, pred: np.ndarray) -> None:
    path = save_dir / PurePosixPath(rgb_rel).with_suffix(".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pred.astype(np.float32))


def _batches(indices: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


@dataclass
class SampleRecord:
    """What scoring one sample leaves for the set's numbers. Picklable: with several processes (torchrun), each
    scores its share and sends these to rank 0, which aggregates them in dataset order as one process does."""
    index: int  # position in the benchmark's fixed order
    name: str
    row: Optional[Dict[str, Any]] = None  # per_sample.csv's row; None: not scored
    pooled: Any = None  # what the scorer pools over the set besides the rows (--pooling pixel: angular errors)
    skipped: Optional[str] = None  # why it could not be scored (--allow_invalid)
    empty_mask: bool = False  # no valid GT pixel (--allow_invalid)
    nonfinite: int = 0  # non-finite prediction values scored as 0 (--allow_invalid)


class ShardFailed(EvaluationError):
    """Another process of a sharded run failed; rank 0 reports why."""


def evaluate_benchmark(
    bench: Benchmark,
    *,
    predictions: Optional[os.PathLike] = None,
    predictor: Any = None,
    checkpoint: Optional[str] = None,
    output: Optional[os.PathLike] = None,
    alignment: Optional[str] = None,
    alignment_max_res: Any = PROTOCOL,
    pooling: str = "image",
    processing_res: Optional[int] = None,
    device: Any = "auto",
    allow_invalid: bool = False,
    save_predictions: Optional[os.PathLike] = None,
    batch_size: int = 1,
    progress: bool = True,
    resize_mode: Optional[str] = None,
    shard: Optional[Shard] = None,
) -> Optional[Dict[str, Any]]:
    """Score one benchmark; returns the summary (also written to ``output/summary.json``).

    ``resize_mode`` is given to the predictor's ``predict`` (None: the predictor's own, e.g. what
    :func:`load_predictor` set). ``shard``: this process's place in a sharded run (default: the only process). It
    scores the samples it owns; with a rendezvous (torchrun) rank 0 gathers every process's records, writes the
    files and returns the summary, the other ranks return None; without one, each process writes its share's
    files under ``output/rank<r>_of_<n>/``. A sample that fails without ``allow_invalid`` fails every process."""
    if (predictions is None) == (predictor is None):
        raise ValueError("give exactly one of predictions (a folder) or predictor")
    shard = shard or Shard()
    device = resolve_device(device)
    pred_dir = Path(predictions) if predictions is not None else None
    if pred_dir is not None and not pred_dir.is_dir():
        raise FileNotFoundError(f"{bench.name}: prediction folder {pred_dir} does not exist")
    save_dir = Path(save_predictions) if save_predictions is not None else None
    if processing_res == PROTOCOL:
        processing_res = bench.protocol_processing_res
    task = getattr(predictor, "task", None)
    if predictor is not None and task is not None and bench.task != "segmentation" and task != bench.task:
        raise EvaluationError(f"{bench.name} is a {bench.task} benchmark but the checkpoint predicts {task!r}")
    scorer = make_scorer(bench, device, alignment, alignment_max_res, pooling)
    gt_of = {e.rgb: e.gt for e in bench.entries} if pred_dir is not None else {}
    owned = [i for i in range(len(bench)) if shard.owns(i)]

    def score_share() -> List[SampleRecord]:
        """This process's records, in dataset order; the first unusable sample raises, unless allow_invalid."""
        from tqdm.auto import tqdm

        invalid = InvalidCounter(allow_invalid)
        records: List[SampleRecord] = []
        desc = f"Evaluating {bench.name}" + (f" (rank 0 of {shard.world_size})" if shard.sharded else "")
        bar = tqdm(total=len(owned), desc=desc, disable=not (progress and shard.is_main), dynamic_ncols=True)

        def skip_or_raise(index: int, name: str, err: Exception) -> None:
            """Without --allow_invalid any unusable sample stops the run, naming it; with it, it is counted."""
            if not allow_invalid:
                if isinstance(err, EvaluationError):
                    raise err
                raise EvaluationError(f"{err} (use --allow_invalid to skip and count such samples)") from err
            records.append(SampleRecord(index, name, skipped=str(err)))

        for idx in _batches(owned, max(1, batch_size)):
            samples = []
            for i in idx:
                try:
                    samples.append((i, bench[i]))
                except Exception as e:  # GT or RGB that cannot be decoded (the reader's message names the sample)
                    name = bench.entries[i].rgb
                    skip_or_raise(i, name, e if name in str(e) else EvaluationError(f"{bench.name} sample {name}: {e}"))
            if predictor is not None and samples:
                geometry = {"resize_mode": resize_mode} if resize_mode is not None else {}
                with torch.no_grad():
                    raw = _as_list(predictor.predict([s.rgb for _, s in samples], processing_res=processing_res,
                                                     batch_size=len(samples), **geometry), len(samples))
            else:
                raw = []
                for i, s in samples:
                    try:
                        raw.append(_read_prediction(pred_dir, bench, s.name, gt_of.get(s.name)))
                    except EvaluationError as e:
                        skip_or_raise(i, s.name, e)
                        raw.append(None)
            for (i, sample), r in zip(samples, raw):
                if r is None:
                    continue
                what = f"{bench.name} sample {sample.name}"
                before = invalid.nonfinite_values
                try:
                    pred = conform_prediction(r, bench.task, sample.gt.shape[:2], what)
                    pred = invalid.check(pred, what)
                except EvaluationError as e:  # wrong shape or dtype; non-finite values without --allow_invalid
                    skip_or_raise(i, sample.name, e)
                    continue
                record = SampleRecord(i, sample.name, nonfinite=invalid.nonfinite_values - before)
                records.append(record)
                if save_dir is not None:
                    _save_prediction(save_dir, sample.name, pred)
                if not sample.valid.any():
                    if not allow_invalid:
                        raise EvaluationError(f"{what}: no valid GT pixels (use --allow_invalid to skip such samples)")
                    record.empty_mask = True
                    continue
                try:
                    row, record.pooled = scorer.score_and_pool(pred, sample)
                except ValueError as e:
                    raise EvaluationError(f"{what}: {e}") from e
                record.row = {"sample": sample.name, **row}
            bar.update(len(samples))
        bar.close()
        return records

    def finish(records: List[SampleRecord], out_dir: Optional[Path]) -> Dict[str, Any]:
        """The set's summary from every record, in dataset order (as one process makes them), and its files."""
        records = sorted(records, key=lambda r: r.index)
        scored = [r for r in records if r.row is not None]
        if not scored:
            raise EvaluationError(f"{bench.name}: no sample could be scored")
        rows = [r.row for r in scored]
        summary: Dict[str, Any] = {"dataset": bench.name, "task": bench.task, "num_samples": len(rows)}
        summary.update(scorer.summarize(rows, [r.pooled for r in scored]))
        proto = {**bench.protocol(), **scorer.protocol()}
        if predictor is not None:
            proto["processing_res"] = processing_res if processing_res is not None else predictor_default_res(predictor)
            proto["resize_mode"] = resize_mode or predictor_resize_mode(predictor)
            proto["geometry"] = describe_geometry(proto["resize_mode"], proto["processing_res"])
        else:
            proto["processing_res"] = None  # predictions read from files, at GT resolution
            proto["resize_mode"] = None
            proto["geometry"] = "predictions read from files at GT resolution (made elsewhere, geometry unknown)"
        summary["protocol"] = proto
        summary["checkpoint"] = str(checkpoint) if predictor is not None else None
        summary["predictions"] = str(pred_dir) if pred_dir is not None else None
        summary["data_root"] = str(bench.root)
        summary["split"] = str(bench.split) if bench.split is not None else None
        summary["skipped_without_gt"] = bench.skipped_without_gt
        skipped_invalid = {r.name: r.skipped for r in records if r.skipped is not None}
        summary["skipped_invalid"] = {"count": len(skipped_invalid), "samples": skipped_invalid}
        summary["invalid"] = {"allow_invalid": allow_invalid,
                              "samples_with_nonfinite": sum(1 for r in records if r.nonfinite),
                              "nonfinite_values": sum(r.nonfinite for r in records),
                              "skipped_empty_mask": sum(1 for r in records if r.empty_mask)}
        if save_dir is not None:
            summary["saved_predictions"] = str(save_dir)
        if shard.sharded and not shard.can_gather():  # RANK / WORLD_SIZE without a rendezvous: this share only
            summary["share"] = {"rank": shard.rank, "of": shard.world_size,
                                "note": f"samples i with i % {shard.world_size} == {shard.rank} only"}

        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            cols = ["sample"] + [k for k in scorer.keys if k in rows[0]] + list(scorer.extra_columns)
            with open(out_dir / "per_sample.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            with open(out_dir / "summary.json", "w") as f:
                json.dump(_jsonable(summary), f, indent=2)
        return summary

    out_dir = Path(output) if output is not None else None
    if not (shard.sharded and shard.can_gather()):
        if shard.sharded and out_dir is not None:  # no rendezvous: each process its own share's files
            out_dir = share_output(out_dir, shard)
        return finish(score_share(), out_dir)

    # torchrun / accelerate launch: every process reaches the gather, with its records or with why it stopped.
    failure: Optional[str] = None
    try:
        records = score_share()
    except Exception as e:  # noqa: BLE001 - sent to rank 0, which reports it; then every process fails
        if not isinstance(e, (EvaluationError, ValueError, OSError)):
            traceback.print_exc()
        records, failure = [], f"rank {shard.rank} of {shard.world_size}: {e}"
    result: Dict[str, Any] = {}

    def on_rank0(shares: List[Tuple[Optional[str], List[SampleRecord]]]) -> Optional[str]:
        failures = [f for f, _ in shares if f is not None]
        if failures:
            return "; ".join(failures)
        result.update(finish([r for _, share in shares for r in share], out_dir))
        return None

    try:
        failed = shard.collect((failure, records), on_rank0)
    except RankZeroFailed as e:
        raise ShardFailed(str(e)) from e
    if failed is not None:
        raise EvaluationError(failed) if shard.is_main else ShardFailed(failed)
    return result if shard.is_main else None


def share_output(output: Path, shard: Shard) -> Path:
    """Where a process of a run without a rendezvous (RANK / WORLD_SIZE only) writes its share's results."""
    return output / f"rank{shard.rank}_of_{shard.world_size}"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

# (metric key, column title, scale) per task; the paper's columns first.
TABLE_COLUMNS = {
    "depth": [("abs_rel", "AbsRel↓", 1), ("delta1", "δ1↑", 1), ("delta2", "δ2↑", 1), ("delta3", "δ3↑", 1),
              ("sq_rel", "SqRel↓", 1), ("rmse", "RMSE↓", 1), ("rmse_log", "RMSElog↓", 1),
              ("log10", "log10↓", 1), ("i_rmse", "iRMSE↓", 1), ("silog", "SILog↓", 1)],
    "normal": [("mean", "Mean↓", 1), ("median", "Med↓", 1), ("rmse", "RMSE↓", 1), ("a5", "5°↑", 1),
               ("a7_5", "7.5°↑", 1), ("a11_25", "11.25°↑", 1), ("a22_5", "22.5°↑", 1), ("a30", "30°↑", 1)],
    "matting": [("sad", "SAD↓", 1), ("mad", "MAD↓", 1), ("mse", "MSE↓", 1), ("conn", "CONN↓", 1),
                ("grad", "Grad↓", 1)],
    "segmentation": [("iou", "IoU↑", 1), ("pixel_acc", "PA↑", 1), ("dice", "Dice↑", 1)],
}
UNITS_NOTE = {
    "depth": "AbsRel and δ as fractions, as in the paper's Table 1 (Marigold prints them ×100); "
             "RMSE in m, iRMSE in 1/m, SILog ×100",
    "normal": "angles in degrees, thresholds in % (the paper's Table 2 prints Mean/100 and 11.25° as a fraction)",
    "matting": "SAD and CONN ÷1000, MAD and MSE raw fractions, Grad ÷10, as P3M and the paper's Table 3",
    "segmentation": "fractions, per-image mean, as in the paper's Tables 4 and 10-29",
}
GROUP_COLUMNS = {
    "all_depth": [("abs_rel", "AbsRel↓"), ("delta1", "δ1↑")],
    "all_normal": [("mean", "Mean↓"), ("median", "Med↓"), ("a11_25", "11.25°↑"), ("a22_5", "22.5°↑"),
                   ("a30", "30°↑")],
}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if v != 0 and abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.3e}"
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.3f}" if abs(v) < 100 else f"{v:.2f}"


def _render(header: List[List[str]], rows: List[List[str]]) -> str:
    all_rows = header + rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([*(line(h) for h in header), sep, *(line(r) for r in rows)])


def format_table(summaries: Sequence[Dict[str, Any]]) -> str:
    """One row per summary (all of one task) with the task's columns."""
    task = summaries[0]["task"]
    cols = TABLE_COLUMNS[task]
    head = ["Dataset", "N"] + [c[1] for c in cols]
    if task == "segmentation":
        head.append("Avg↑")
    rows = []
    for s in summaries:
        row = [BENCHMARKS[s["dataset"]].title, str(s["num_samples"])] + [_fmt(s.get(k)) for k, _, _ in cols]
        if task == "segmentation":
            row.append(_fmt(sum(s[k] for k, _, _ in cols) / len(cols)))
        rows.append(row)
    return f"[{UNITS_NOTE[task]}]\n" + _render([head], rows)


def format_group_table(group: str, summaries: Dict[str, Dict[str, Any]], label: str) -> str:
    """The paper's Table 1 / Table 2 layout: one column group per dataset, one row for the method."""
    names = GROUPS[group]
    cols = GROUP_COLUMNS[group]
    top, sub, vals = ["Method"], [""], [label]
    for name in names:
        title = BENCHMARKS[name].title
        n = summaries[name]["num_samples"] if name in summaries else 0
        for j, (key, ctitle) in enumerate(cols):
            top.append(f"{title} (N={n})" if j == 0 and name in summaries else (title if j == 0 else ""))
            sub.append(ctitle)
            vals.append(_fmt(summaries[name].get(key)) if name in summaries else "-")
    task = "depth" if group == "all_depth" else "normal"
    return f"[{UNITS_NOTE[task]}]\n" + _render([top, sub], [vals])


def report_skipped(summary: Dict[str, Any], print_fn=print) -> None:
    """Name every sample --allow_invalid left out, so a partial average is never mistaken for a full one."""
    skipped = summary.get("skipped_invalid", {}).get("samples", {})
    for reason in skipped.values():
        print_fn(f"skipped: {reason}")
    nonfinite = summary.get("invalid", {}).get("samples_with_nonfinite", 0)
    if skipped or nonfinite:
        print_fn(f"{summary['dataset']}: {len(skipped)} samples skipped as invalid, {nonfinite} with non-finite "
                 f"values scored as 0; averages over {summary['num_samples']} samples (details in summary.json)")


# ----------------------------------------------------------------------------------------------
# Entry point used by evaluate.py
# ----------------------------------------------------------------------------------------------

def run(
    dataset: str,
    data_root: os.PathLike,
    *,
    checkpoint: Optional[str] = None,
    predictions: Optional[os.PathLike] = None,
    predictor: Any = None,
    output: Optional[os.PathLike] = None,
    split: Optional[os.PathLike] = None,
    reader_kwargs: Optional[Dict[str, Any]] = None,
    print_fn=print,
    shard: Optional[Shard] = None,
    **kwargs,
) -> Dict[str, Dict[str, Any]]:
    """Evaluate one dataset or a group (``all_depth`` / ``all_normal``); print the table; return
    {dataset name: summary}. ``predictor`` may be passed instead of loading ``checkpoint``.
    ``reader_kwargs`` go to the reader (for a group: ``{dataset name: kwargs}``); the other keyword
    arguments to :func:`evaluate_benchmark`. ``shard``: this process's place among several (evaluate.py reads it
    from torchrun's environment; default: the only process); with a rendezvous only rank 0 prints and returns the
    summaries, the others return {}."""
    if (checkpoint is None and predictor is None) == (predictions is None):
        raise ValueError("give exactly one of --checkpoint or --predictions")
    shard = shard or Shard()
    data_root = Path(data_root)
    if not data_root.exists():
        raise FileNotFoundError(f"data root {data_root} does not exist")
    output = Path(output) if output is not None else Path("eval_results") / dataset
    device = kwargs.pop("device", "auto")
    # several processes on a GPU machine: one GPU each (LOCAL_RANK), as infer.py
    device = resolve_device(shard.device() if device in (None, "auto") and shard.device() else device)
    base_model = kwargs.pop("pretrained_model_name_or_path", None)  # for an official .pth checkpoint
    official_preprocess = kwargs.pop("official_preprocess", False)
    resize_mode = kwargs.pop("resize_mode", None)  # None: squash for a checkpoint, a given predictor's own
    gathered = shard.sharded and shard.can_gather()
    with shard.connected():  # one rendezvous for the model load and every dataset of a group
        if predictor is None and checkpoint is not None:
            if not gathered:
                predictor = load_predictor(checkpoint, device, base_model, official_preprocess, resize_mode)
            else:  # a process that cannot load the model stops every process, not only itself
                failure = None
                try:
                    predictor = load_predictor(checkpoint, device, base_model, official_preprocess, resize_mode)
                except Exception as e:  # noqa: BLE001 - reported by rank 0, then raised by every process
                    if not isinstance(e, (EvaluationError, ValueError, OSError)):
                        traceback.print_exc()
                    failure = f"rank {shard.rank} of {shard.world_size}: cannot load {checkpoint}: {e}"
                _agree(shard, failure)
        elif resize_mode is not None:
            kwargs["resize_mode"] = resize_mode
        return _run_loaded(dataset, data_root, shard, gathered, checkpoint=checkpoint, predictions=predictions,
                           predictor=predictor, output=output, split=split, reader_kwargs=reader_kwargs,
                           print_fn=print_fn, device=device, **kwargs)


def _agree(shard: Shard, failure: Optional[str]) -> None:
    """Every process of a run with a rendezvous raises if any one had a `failure` (rank 0 with every reason)."""
    try:
        failed = shard.collect(failure, lambda everyone: "; ".join(f for f in everyone if f is not None) or None)
    except RankZeroFailed as e:
        raise ShardFailed(str(e)) from e
    if failed is not None:
        raise EvaluationError(failed) if shard.is_main else ShardFailed(failed)


def _run_loaded(dataset, data_root, shard: Shard, gathered: bool, *, checkpoint, predictions, predictor, output,
                split, reader_kwargs, print_fn, device, **kwargs) -> Dict[str, Dict[str, Any]]:
    label = str(checkpoint) if checkpoint is not None else str(predictions)
    save = kwargs.pop("save_predictions", None)
    if gathered and not shard.is_main:
        print_fn = _silent  # rank 0 prints the run's tables
    elif shard.sharded and not gathered:  # RANK / WORLD_SIZE without a rendezvous: each process its own share
        where = f"rank {shard.rank} of {shard.world_size}"
        print_fn(f"{where}: no rendezvous (MASTER_ADDR/MASTER_PORT) to combine the processes' results; "
                 f"numbers below are this process's share (samples i with i % {shard.world_size} == {shard.rank})")
        label = f"{label} [{where}]"

    if dataset in GROUPS:
        if split is not None:
            raise ValueError("--split applies to a single dataset, not to " + dataset)
        summaries: Dict[str, Dict[str, Any]] = {}
        for name in GROUPS[dataset]:
            cls = BENCHMARKS[name]
            loc = cls.present_in(data_root)
            if loc is None:
                print_fn(f"{name}: not found under {data_root} (looked for {', '.join(cls.default_paths)}), "
                         "skipped")
                continue
            bench = cls(loc, None, **(reader_kwargs or {}).get(name, {}))
            summary = evaluate_benchmark(
                bench, predictions=Path(predictions) / name if predictions is not None else None,
                predictor=predictor, checkpoint=checkpoint, output=output / name, device=device,
                save_predictions=Path(save) / name if save is not None else None, shard=shard, **kwargs)
            if summary is not None:
                summaries[name] = summary
        if gathered and not shard.is_main:
            return {}
        if not summaries:
            raise FileNotFoundError(f"{dataset}: none of {', '.join(GROUPS[dataset])} found under {data_root}")
        print_fn(format_group_table(dataset, summaries, label))
        for s in summaries.values():
            report_skipped(s, print_fn)
        sub = share_output(Path("<name>"), shard) if shard.sharded and not gathered else Path("<name>")
        print_fn(f"per-dataset per_sample.csv and summary.json in {output / sub}/")
        return summaries

    if dataset not in BENCHMARKS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(BENCHMARKS) + sorted(GROUPS)}")
    bench = BENCHMARKS[dataset](data_root, split, **(reader_kwargs or {}))
    summary = evaluate_benchmark(bench, predictions=predictions, predictor=predictor, checkpoint=checkpoint,
                                 output=output, device=device, save_predictions=save, shard=shard, **kwargs)
    if summary is None:  # another rank than 0 of a sharded run
        return {}
    print_fn(format_table([summary]))
    report_skipped(summary, print_fn)
    if shard.sharded and not gathered:
        output = share_output(output, shard)
    print_fn(f"per-sample metrics: {output / 'per_sample.csv'}; summary: {output / 'summary.json'}")
    return {dataset: summary}


def _silent(*args, **kwargs) -> None:
    pass
