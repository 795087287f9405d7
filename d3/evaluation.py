"""The scoring loop behind ``evaluate.py``, shared by ``--predictions`` and ``--checkpoint``.

Per sample: get the prediction (a file, or the one-step predictor in memory), check its shape and
values, align / clip (depth), compute the metrics of :mod:`d3.metrics`; then average with equal
weight per image and write ``per_sample.csv`` and ``summary.json``. ``--checkpoint`` predicts in the paper's
geometry by default, a squash to the square processing resolution (:mod:`d3.eval_predictor`); summary.json records
it.
Under torchrun each process scores the samples it owns (:mod:`d3.sharding`), and rank 0 aggregates every sample's
:class:`SampleRecord` in dataset order, as one process does.

What a run is told is an :class:`EvalOptions` (:mod:`d3.eval_options`). Prediction files are found and read by
:mod:`d3.prediction_files`, scored by :mod:`d3.scorers`, and reported by :mod:`d3.eval_report`.
"""

from __future__ import annotations

import csv
import json
import os
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from d3.data.benchmarks import BENCHMARKS, GROUPS, Benchmark
from d3.devices import resolve_device, use_device
from d3.eval_options import EvalOptions
from d3.eval_predictor import (
    describe_geometry,
    load_predictor,
    outputs_per_image,
    precision_record,
    predictor_default_res,
    predictor_resize_mode,
)
from d3.eval_report import format_group_table, format_table, jsonable, report_skipped
from d3.flags import PROTOCOL
from d3.prediction_files import EvaluationError, conform_prediction, read_prediction
from d3.scorers import make_scorer
from d3.sharding import RankZeroFailed, Shard

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
    row: dict[str, Any] | None = None  # per_sample.csv's row; None: not scored
    pooled: Any = None  # what the scorer pools over the set besides the rows (--pooling pixel: angular errors)
    skipped: str | None = None  # why it could not be scored (--allow_invalid)
    empty_mask: bool = False  # no valid GT pixel (--allow_invalid)
    nonfinite: int = 0  # non-finite prediction values scored as 0 (--allow_invalid)


class ShardFailed(EvaluationError):
    """Another process of a sharded run failed; rank 0 reports why."""


def evaluate_benchmark(bench: Benchmark, options: EvalOptions | None = None, *, predictor: Any = None,
                       shard: Shard | None = None) -> dict[str, Any] | None:
    """Score one benchmark: ``options.predictions`` (a folder) or ``predictor``'s; returns the summary (also written
    to ``options.output/summary.json``; output None: no files). ``options.checkpoint`` names the predictor there.

    ``options.resize_mode`` is given to the predictor's ``predict`` (None: the predictor's own, e.g. what
    :func:`load_predictor` set); ``split``, ``pretrained_model_name_or_path`` and ``official_preprocess`` are
    :func:`run`'s. ``shard``: this process's place in a sharded run (default: the only process). It scores the
    samples it owns; with a rendezvous (torchrun) rank 0 gathers every process's records, writes the files and
    returns the summary, the other ranks return None; without one, each process writes its share's files under
    ``output/rank<r>_of_<n>/``. A sample that fails without ``allow_invalid`` fails every process."""
    options = options or EvalOptions()
    if (options.predictions is None) == (predictor is None):
        raise ValueError("give exactly one of predictions (a folder) or predictor")
    shard = shard or Shard()
    device = resolve_device(options.device)
    allow_invalid, resize_mode = options.allow_invalid, options.resize_mode
    pred_dir = Path(options.predictions) if options.predictions is not None else None
    if pred_dir is not None and not pred_dir.is_dir():
        raise FileNotFoundError(f"{bench.name}: prediction folder {pred_dir} does not exist")
    save_dir = Path(options.save_predictions) if options.save_predictions is not None else None
    processing_res = options.processing_res
    if processing_res == PROTOCOL:
        processing_res = bench.protocol_processing_res
    task = getattr(predictor, "task", None)
    if predictor is not None and task is not None and bench.task != "segmentation" and task != bench.task:
        raise EvaluationError(f"{bench.name} is a {bench.task} benchmark but the checkpoint predicts {task!r}")
    scorer = make_scorer(bench, device, options.alignment, options.alignment_max_res, options.pooling)
    gt_of = {e.rgb: e.gt for e in bench.entries} if pred_dir is not None else {}
    owned = [i for i in range(len(bench)) if shard.owns(i)]

    def score_share() -> list[SampleRecord]:
        """This process's records, in dataset order; the first unusable sample raises, unless allow_invalid."""
        from tqdm.auto import tqdm

        invalid = InvalidCounter(allow_invalid)
        records: list[SampleRecord] = []
        desc = f"Evaluating {bench.name}" + (f" (rank 0 of {shard.world_size})" if shard.sharded else "")
        bar = tqdm(total=len(owned), desc=desc, disable=not (options.progress and shard.is_main), dynamic_ncols=True)

        def skip_or_raise(index: int, name: str, err: Exception) -> None:
            """Without --allow_invalid any unusable sample stops the run, naming it; with it, it is counted."""
            if not allow_invalid:
                if isinstance(err, EvaluationError):
                    raise err
                raise EvaluationError(f"{err} (use --allow_invalid to skip and count such samples)") from err
            records.append(SampleRecord(index, name, skipped=str(err)))

        for idx in _batches(owned, max(1, options.batch_size)):
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
                    raw = outputs_per_image(predictor.predict([s.rgb for _, s in samples], processing_res=processing_res,
                                                     batch_size=len(samples), **geometry), len(samples))
            else:
                raw = []
                for i, s in samples:
                    try:
                        raw.append(read_prediction(pred_dir, bench, s.name, gt_of.get(s.name)))
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

    def finish(records: list[SampleRecord], out_dir: Path | None) -> dict[str, Any]:
        """The set's summary from every record, in dataset order (as one process makes them), and its files."""
        records = sorted(records, key=lambda r: r.index)
        scored = [r for r in records if r.row is not None]
        if not scored:
            raise EvaluationError(f"{bench.name}: no sample could be scored")
        rows = [r.row for r in scored]
        summary: dict[str, Any] = {"dataset": bench.name, "task": bench.task, "num_samples": len(rows)}
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
        summary["checkpoint"] = str(options.checkpoint) if predictor is not None else None
        summary["predictions"] = str(pred_dir) if pred_dir is not None else None
        summary.update(precision_record(predictor, device))  # "device", "dtype" of the predictions made here
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
                json.dump(jsonable(summary), f, indent=2)
        return summary

    out_dir = Path(options.output) if options.output is not None else None
    if not (shard.sharded and shard.can_gather()):
        if shard.sharded and out_dir is not None:  # no rendezvous: each process its own share's files
            out_dir = share_output(out_dir, shard)
        return finish(score_share(), out_dir)

    # torchrun / accelerate launch: every process reaches the gather, with its records or with why it stopped.
    failure: str | None = None
    try:
        records = score_share()
    except Exception as e:  # noqa: BLE001 - sent to rank 0, which reports it; then every process fails
        if not isinstance(e, (EvaluationError, ValueError, OSError)):
            traceback.print_exc()
        records, failure = [], f"rank {shard.rank} of {shard.world_size}: {e}"
    result: dict[str, Any] = {}

    def on_rank0(shares: list[tuple[str | None, list[SampleRecord]]]) -> str | None:
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


def run(dataset: str, data_root: os.PathLike, options: EvalOptions | None = None, *, predictor: Any = None,
        reader_kwargs: dict[str, Any] | None = None, print_fn=print, shard: Shard | None = None,
        ) -> dict[str, dict[str, Any]]:
    """Evaluate one dataset or a group (``all_depth`` / ``all_normal``) as ``options`` say (default:
    :class:`EvalOptions`'s defaults); print the table; return {dataset name: summary}. ``predictor`` may be passed
    instead of loading ``options.checkpoint``. ``reader_kwargs`` go to the reader (for a group: ``{dataset name:
    kwargs}``). ``shard``: this process's place among several (evaluate.py reads it from torchrun's environment;
    default: the only process); with a rendezvous only rank 0 prints and returns the summaries, the others return
    {}."""
    options = options or EvalOptions()
    checkpoint = options.checkpoint
    if (checkpoint is None and predictor is None) == (options.predictions is None):
        raise ValueError("give exactly one of --checkpoint or --predictions")
    shard = shard or Shard()
    data_root = Path(data_root)
    if not data_root.exists():
        raise FileNotFoundError(f"data root {data_root} does not exist")
    output = Path(options.output) if options.output is not None else Path("eval_results") / dataset
    device = options.device
    # several processes on a GPU machine: one GPU each (LOCAL_RANK), as infer.py
    device = resolve_device(shard.device() if device in (None, "auto") and shard.device() else device)
    use_device(device)  # cuda:K the current device: no context on cuda:0, streams and events on the model's GPU
    options = replace(options, output=output, device=device)
    gathered = shard.sharded and shard.can_gather()
    with shard.connected():  # one rendezvous for the model load and every dataset of a group
        if predictor is None and checkpoint is not None:
            load_args = (checkpoint, device, options.pretrained_model_name_or_path, options.official_preprocess,
                         options.resize_mode, options.dtype)
            if not gathered:
                predictor = load_predictor(*load_args)
            else:  # a process that cannot load the model stops every process, not only itself
                failure = None
                try:
                    predictor = load_predictor(*load_args)
                except Exception as e:  # noqa: BLE001 - reported by rank 0, then raised by every process
                    if not isinstance(e, (EvaluationError, ValueError, OSError)):
                        traceback.print_exc()
                    failure = f"rank {shard.rank} of {shard.world_size}: cannot load {checkpoint}: {e}"
                _agree(shard, failure)
            options = replace(options, resize_mode=None)  # load_predictor set it on the predictor (None: squash)
        return _run_loaded(dataset, data_root, options, predictor, shard, gathered, reader_kwargs, print_fn)


def _agree(shard: Shard, failure: str | None) -> None:
    """Every process of a run with a rendezvous raises if any one had a `failure` (rank 0 with every reason)."""
    try:
        failed = shard.collect(failure, lambda everyone: "; ".join(f for f in everyone if f is not None) or None)
    except RankZeroFailed as e:
        raise ShardFailed(str(e)) from e
    if failed is not None:
        raise EvaluationError(failed) if shard.is_main else ShardFailed(failed)


def _run_loaded(dataset: str, data_root: Path, options: EvalOptions, predictor: Any, shard: Shard, gathered: bool,
                reader_kwargs: dict[str, Any] | None, print_fn) -> dict[str, dict[str, Any]]:
    """:func:`run` once the predictor (if any) is loaded; ``options.output`` and ``options.device`` are set."""
    predictions, save, output = options.predictions, options.save_predictions, Path(options.output)
    label = str(options.checkpoint) if options.checkpoint is not None else str(predictions)
    if gathered and not shard.is_main:
        print_fn = _silent  # rank 0 prints the run's tables
    elif shard.sharded and not gathered:  # RANK / WORLD_SIZE without a rendezvous: each process its own share
        where = f"rank {shard.rank} of {shard.world_size}"
        print_fn(f"{where}: no rendezvous (MASTER_ADDR/MASTER_PORT) to combine the processes' results; "
                 f"numbers below are this process's share (samples i with i % {shard.world_size} == {shard.rank})")
        label = f"{label} [{where}]"

    if dataset in GROUPS:
        if options.split is not None:
            raise ValueError("--split applies to a single dataset, not to " + dataset)
        summaries: dict[str, dict[str, Any]] = {}
        for name in GROUPS[dataset]:
            cls = BENCHMARKS[name]
            loc = cls.present_in(data_root)
            if loc is None:
                print_fn(f"{name}: not found under {data_root} (looked for {', '.join(cls.default_paths)}), "
                         "skipped")
                continue
            bench = cls(loc, None, **(reader_kwargs or {}).get(name, {}))
            per_set = replace(options, output=output / name,
                              predictions=Path(predictions) / name if predictions is not None else None,
                              save_predictions=Path(save) / name if save is not None else None)
            summary = evaluate_benchmark(bench, per_set, predictor=predictor, shard=shard)
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
    bench = BENCHMARKS[dataset](data_root, options.split, **(reader_kwargs or {}))
    summary = evaluate_benchmark(bench, options, predictor=predictor, shard=shard)
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
