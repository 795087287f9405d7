"""In-training validation: the student being trained, scored on benchmarks by evaluate.py's own code.

`--validation_dataset NAME=PATH[:N]` names an evaluate.py benchmark and its first N samples. Every
`--validation_steps` optimizer updates (and after the last) the student predicts them in evaluate.py --checkpoint's
geometry (the square processing resolution, squashed), through the same loop that scores `evaluate.py --checkpoint`
(`d3.evaluation.evaluate_benchmark`: reader, shapes, alignment, metrics, the mean over images, the split over
processes), with the student's current weights in eval mode and no_grad: no copy of the model, no draw from any
random generator of the run, every module's mode restored afterwards. What comes out: `val/<set>/<metric>` and the
time spent in every tracker, one console line, per set a picture of the first `--validation_images` samples (input |
prediction | ground truth | error) in the trackers and under `OUTPUT/validation/step-K/`, with evaluate.py's
`per_sample.csv` and `summary.json` beside it, one line per validation in `OUTPUT/validation/history.jsonl`, and
`OUTPUT/best/` (an inference folder and `best.json`) whenever `--best_metric` improves.

Above training and evaluation both: the loop (`d3.training.train`) is handed `Validation` by `d3.train_cli` and calls
`attach` once and `after_step` per update; it never imports this module, so training still does not reach the
inference layer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from d3.checkpoint import D3Config
from d3.data.benchmarks import BENCHMARKS, Benchmark
from d3.eval_options import EvalOptions
from d3.eval_predictor import EVAL_RESIZE_MODE
from d3.evaluation import evaluate_benchmark
from d3.predictor import D3Predictor
from d3.prediction_files import EvaluationError
from d3.scorers import make_scorer
from d3.sharding import Shard
from d3.training_args import DEFAULT_VALIDATION_STEPS, parse_validation_spec
from d3.validation_pictures import log_pictures, picture_of_set

logger = logging.getLogger("d3.train")

# The metric a set is judged by unless --best_metric says otherwise, per task, and the metrics where more is better.
MAIN_METRIC = {"depth": "abs_rel", "normal": "mean", "matting": "sad", "segmentation": "iou"}
SHOWN = {"depth": ("abs_rel", "delta1"), "normal": ("mean", "a11_25"), "matting": ("sad", "mse"),
         "segmentation": ("iou", "dice")}  # the console line's metrics per task (the best metric's first)
HIGHER_IS_BETTER = frozenset({"delta1", "delta2", "delta3", "a5", "a7_5", "a11_25", "a22_5", "a30", "iou",
                              "pixel_acc", "dice"})


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return value == value  # a NaN never counts as the best
    return value > best if metric in HIGHER_IS_BETTER else value < best


@dataclass
class ValidationSet:
    name: str
    bench: Benchmark
    keys: tuple[str, ...] = ()  # the metrics its scorer reports (logged as val/<name>/<metric>)


def open_sets(specs: list[str], task: str) -> list[ValidationSet]:
    """Each `NAME=PATH[:N]` as evaluate.py's reader of the first N samples; a set that cannot be opened, or scores
    another task, stops the run before the model loads."""
    sets = []
    for spec in specs:
        name, path, count = parse_validation_spec(spec)
        try:
            bench = BENCHMARKS[name](Path(path).expanduser(), None)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --validation_dataset {spec}: {e}") from None
        if bench.task != "segmentation" and bench.task != task:
            raise SystemExit(f"error: --validation_dataset {spec}: a {bench.task} benchmark, but this run trains "
                             f"{task}")
        if count is not None:
            bench.entries = bench.entries[:count]  # the first N of the benchmark's fixed order
        sets.append(ValidationSet(name, bench, tuple(make_scorer(bench, "cpu").keys)))
    return sets


class LivePredictor(D3Predictor):
    """The student being trained as evaluate.py's predictor: its modules themselves (no copy, no cast; the VAE may
    stay in the run's lower precision), the timestep it has now, evaluate.py --checkpoint's geometry."""

    def __init__(self, model, vae, prompt_embeds, config: D3Config):  # noqa: D107 - no super(): it would cast
        param = next(model.student.parameters())
        self.config, self.device, self.dtype = config, param.device, param.dtype
        self.unet, self.vae, self.denoiser = model.student, vae, model.denoiser
        self.prompt_embeds = (prompt_embeds.to(self.device, self.dtype) if torch.is_tensor(prompt_embeds) else
                              {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                               for k, v in prompt_embeds.items()})
        self.size_multiple = self.denoiser.size_multiple(vae)
        self.channels_last = False
        self.compiled = False


@contextmanager
def evaluating(modules, device: torch.device):
    """Eval mode and no_grad for the block; afterwards every submodule's mode is as before, and the random states
    (CPU and this device's) are as before, whatever ran inside."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for module in modules:
                module.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class Validation:
    """Built from the flags before the model loads (`open_sets` checks every set); `attach` gives it the run."""

    def __init__(self, args, recipe):
        self.args, self.recipe = args, recipe
        self.sets = open_sets(args.validation_dataset, recipe.task)
        self.every = args.validation_steps or DEFAULT_VALIDATION_STEPS
        name, _, metric = (args.best_metric or f"{self.sets[0].name}/").partition("/")
        chosen = self.keys[name] if name in self.keys else ()
        metric = metric or MAIN_METRIC[next(s.bench.task for s in self.sets if s.name == name)]
        if metric not in chosen:
            raise SystemExit(f"error: --best_metric {name}/{metric}: {name} reports {', '.join(chosen)}")
        self.best_set, self.best_metric = name, metric
        self.best: dict | None = None

    # ------------------------------------------------------------------------------------------------ the run
    def attach(self, accelerator, model, vae, prompt_embeds, export, output_dir: Path, step: int,
               resumed: bool) -> None:
        """The run's parts (`model` unwrapped; `export(path, None)` writes an inference folder); restores the best so
        far of a resumed run; validates step 0 with --validate_at_start."""
        if accelerator.distributed_type == DistributedType.FSDP:
            raise SystemExit("error: --validation_dataset: not under FSDP (the student is sharded); validate the "
                             "checkpoints with evaluate.py instead")
        self.accelerator, self.model, self.vae, self.prompt_embeds = accelerator, model, vae, prompt_embeds
        self.export, self.output_dir = export, Path(output_dir)
        self.shard = Shard(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index)
        best = self.output_dir / "best"
        if accelerator.is_main_process:
            tidy_interrupted_best(self.output_dir)
        if resumed and (best / "best.json").exists():
            recorded = json.loads((best / "best.json").read_text())
            if (recorded.get("set"), recorded.get("metric")) == (self.best_set, self.best_metric):
                self.best = recorded
                accelerator.print(f"best so far: {self.best_set}/{self.best_metric} {recorded['value']:.6g} at "
                                  f"step {recorded['step']}")
            else:
                logger.warning("%s holds the best by %s/%s; this run keeps the best by %s/%s and will replace it",
                               best, recorded.get("set"), recorded.get("metric"), self.best_set, self.best_metric)
        if step == 0 and self.args.validate_at_start:
            self.run(0)

    def after_step(self, step: int) -> None:
        if step % self.every == 0 or step >= self.args.max_train_steps:
            self.run(step)

    def run(self, step: int) -> dict[str, dict[str, float]]:
        """Score every set at `step` (every process its share), log, picture, keep the best; returns {set: summary}
        on the main process."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        folder = self.output_dir / "validation" / f"step-{step}"
        config = D3Config(task=self.recipe.task, student_timestep=float(self.model.student_timestep.detach().float()),
                          prompt=self.args.prompt, processing_res=self.args.resolution,
                          resize_mode=EVAL_RESIZE_MODE, architecture=self.model.denoiser.architecture)
        predictor = LivePredictor(self.model, self.vae, self.prompt_embeds, config)
        summaries, seconds, pictures = {}, {}, {}
        with evaluating([self.model, self.vae], accelerator.device), accelerator.autocast():
            for vset in self.sets:
                start = time.perf_counter()
                options = EvalOptions(checkpoint=f"{self.output_dir} at step {step} (in training)",
                                      output=folder / vset.name if main else None, device=accelerator.device,
                                      allow_invalid=True, progress=False)
                try:
                    summary = evaluate_benchmark(vset.bench, options, predictor=predictor, shard=self.shard)
                except EvaluationError as e:  # e.g. no sample of the set could be read: reported, not fatal
                    logger.warning("validation of %s at step %d failed: %s", vset.name, step, e)
                    continue
                if main and self.args.validation_images:
                    pictures[vset.name] = picture_of_set(predictor, vset.bench, self.args.validation_images)
                seconds[vset.name] = time.perf_counter() - start
                if summary is not None:
                    summaries[vset.name] = summary
        self.model.capture.clear()  # the student's hooks captured the validation's features: nobody pops them
        if main:
            self._report(step, summaries, seconds, pictures, folder)
        accelerator.wait_for_everyone()
        return summaries

    # ----------------------------------------------------------------------------------------- main process
    def _report(self, step, summaries, seconds, pictures, folder: Path) -> None:
        accelerator = self.accelerator
        values = {name: {k: float(s[k]) for k in self.keys[name] if k in s} for name, s in summaries.items()}
        logs = {f"val/{name}/{k}": v for name, vs in values.items() for k, v in vs.items()}
        logs.update({f"val/{name}/time_s": t for name, t in seconds.items()})
        logs["val/time_s"] = sum(seconds.values())
        accelerator.log(logs, step=step)
        for name, image in pictures.items():
            folder.mkdir(parents=True, exist_ok=True)
            log_pictures(accelerator, folder / f"{name}.png", f"val/{name}", image, step)
        parts = []
        for name, s in summaries.items():
            shown = [self.best_metric] if name == self.best_set else []
            shown += [k for k in SHOWN[s["task"]] if k not in shown and k in s]
            skipped = s["skipped_invalid"]["count"]
            parts.append(f"{name} ({s['num_samples']}" + (f", {skipped} unreadable" if skipped else "") + ") "
                         + " ".join(f"{k} {s[k]:.4f}" for k in shown))
            for sample, why in s["skipped_invalid"]["samples"].items():
                logger.warning("validation %s: sample %s skipped: %s", name, sample, why)
        value = summaries.get(self.best_set, {}).get(self.best_metric)
        improved = value is not None and is_better(float(value), None if self.best is None else self.best["value"],
                                                   self.best_metric)
        if improved:
            self.best = {"step": step, "set": self.best_set, "metric": self.best_metric, "value": float(value),
                         "higher_is_better": self.best_metric in HIGHER_IS_BETTER}
            write_best(self.output_dir, self.export, self.best)
        best = ("" if self.best is None else f"; best {self.best_set}/{self.best_metric} {self.best['value']:.4f} "
                f"at step {self.best['step']}" + (" (new: best/ written)" if improved else ""))
        logger.info("validation at step %d (%.1f s): %s%s", step, logs["val/time_s"], "; ".join(parts) or "no set "
                    "scored", best)
        record = {"step": step, "time_s": logs["val/time_s"], "values": values, "best": self.best}
        history = self.output_dir / "validation" / "history.jsonl"
        history.parent.mkdir(parents=True, exist_ok=True)
        with open(history, "a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def keys(self) -> dict[str, tuple[str, ...]]:
        return {s.name: s.keys for s in self.sets}


def write_best(output_dir: Path, export, best: dict) -> None:
    """OUTPUT/best/ replaced whole or not at all: written as `.best.tmp`, the old one set aside as `.best.old` while
    the new one is renamed into place."""
    final, tmp, aside = output_dir / "best", output_dir / ".best.tmp", output_dir / ".best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    export(tmp, None)
    (tmp / "best.json").write_text(json.dumps(best, indent=1))
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def tidy_interrupted_best(output_dir: Path) -> None:
    """What a run killed inside `write_best` left: a partial `.best.tmp` goes; `.best.old` goes back into place if
    the new best/ never arrived, and goes otherwise."""
    shutil.rmtree(output_dir / ".best.tmp", ignore_errors=True)
    aside = output_dir / ".best.old"
    if aside.exists():
        if (output_dir / "best").exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, output_dir / "best")
