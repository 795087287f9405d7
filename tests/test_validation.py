"""In-training validation (--validation_dataset): the numbers are evaluate.py's, training is untouched, best/ is the
best, pictures and tracker scalars appear, bad flags and bad samples are handled, a kill mid-validation resumes, and
two processes log what one does.

Every run is the depth recipe through `d3.train_cli.main` (the command line's own path) on the tiny backbone, with
held-out synthetic scenes (some invalid pixels, another size than the training squares) as the validation set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train_depth
from d3.data.synthetic import write_synthetic_dataset
from d3.flags import FlagError
from d3.train_cli import main as train_main
from d3.training_args import build_parser, validate_args

ROOT = Path(__file__).resolve().parents[1]
N = 5  # validation samples: the first 5 of the 6 held-out scenes
REL = 1e-6  # validation against evaluate.py, relative
METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("val") / "train", 8, 32, 32, seed=3, tasks=("depth",),
                                   invalid_fraction=0.0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("val") / "held", 6, 40, 48, seed=11, tasks=("depth",))


def flags(backbone: Path, data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "7",
            "--adam_epsilon", "1e-3", "--log_history", str(out / "history.json"),
            "--export_every", "1", *extra]  # checkpoint-2 carries an inference folder to compare with


def validating(held: Path, *extra: str) -> list[str]:
    return ["--validation_dataset", f"synthetic={held}:{N}", "--validation_steps", "2", "--validate_at_start",
            "--validation_images", "2", *extra]


def logged(out: Path) -> dict[int, dict]:
    """{step: that validation's line of OUTPUT/validation/history.jsonl}."""
    lines = (out / "validation" / "history.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def evaluate_py(checkpoint: Path, held: Path, tmp: Path) -> dict:
    """`evaluate.py --checkpoint` on the first N held-out scenes (a split file naming them), as a user runs it."""
    names = sorted(p.name for p in (held / "rgb").glob("*.png"))[:N]
    tmp.mkdir(parents=True, exist_ok=True)
    split = tmp / "split.txt"
    split.write_text("".join(f"rgb/{n} depth/{n[:-4]}.npy\n" for n in names))
    output = tmp / f"eval-{checkpoint.name}"
    status = evaluate.main(["--dataset", "synthetic", "--data-root", str(held), "--checkpoint", str(checkpoint),
                            "--split", str(split), "--output", str(output), "--device", "cpu", "--no_progress"])
    assert status == 0
    return json.loads((output / "summary.json").read_text())


@pytest.fixture(scope="module")
def validated_run(tiny_backbone_dir, scenes, held_out, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val") / "with"
    train_main(train_depth.RECIPE, flags(tiny_backbone_dir, scenes, out, *validating(held_out),
                                         "--report_to", "tensorboard"))
    return out


@pytest.fixture(scope="module")
def plain_run(tiny_backbone_dir, scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val") / "without"
    train_main(train_depth.RECIPE, flags(tiny_backbone_dir, scenes, out))
    return out


def test_logged_values_equal_evaluate_py_on_that_steps_inference_folder(validated_run, held_out, tmp_path):
    values = logged(validated_run)
    assert sorted(values) == [0, 2, 4]
    best = json.loads((validated_run / "best" / "best.json").read_text())
    folders = {4: validated_run, 2: validated_run / "checkpoint-2", best["step"]: validated_run / "best"}
    for step, folder in folders.items():
        reference = evaluate_py(folder, held_out, tmp_path / str(step))
        assert reference["num_samples"] == N
        ours = values[step]["values"]["synthetic"]
        for metric in METRICS:
            assert abs(ours[metric] - reference[metric]) <= REL * abs(reference[metric]), (step, metric)
        written = json.loads((validated_run / "validation" / f"step-{step}" / "synthetic" / "summary.json").read_text())
        assert written["num_samples"] == N and written["abs_rel"] == ours["abs_rel"]
    # the steps differ (training moved the weights), so the agreement above is not between identical models
    assert len({values[s]["values"]["synthetic"]["abs_rel"] for s in values}) == 3


def test_validation_does_not_change_training(validated_run, plain_run):
    for part in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-4/training_state/model.safetensors"):
        a, b = load_file(validated_run / part), load_file(plain_run / part)
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], part
    ha = json.loads((validated_run / "history.json").read_text())
    hb = json.loads((plain_run / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    from accelerate.utils.other import load as load_rng

    ra, rb = (load_rng(run / "checkpoint-4" / "training_state" / "random_states_0.pkl")
              for run in (validated_run, plain_run))
    assert torch.equal(ra["torch_manual_seed"], rb["torch_manual_seed"])
    assert not (plain_run / "validation").exists() and not (plain_run / "best").exists()


def test_best_is_the_best_logged_value_and_loads_as_an_inference_folder(validated_run):
    values = {s: r["values"]["synthetic"]["abs_rel"] for s, r in logged(validated_run).items()}
    best = json.loads((validated_run / "best" / "best.json").read_text())
    assert (best["set"], best["metric"], best["higher_is_better"]) == ("synthetic", "abs_rel", False)
    assert best["value"] == min(values.values()) and values[best["step"]] == best["value"]
    from d3.loading import load_predictor

    predictor = load_predictor(validated_run / "best", device="cpu")
    assert predictor.task == "depth"
    assert not list(validated_run.glob(".best*"))


def test_pictures_and_tracker_scalars(validated_run):
    from PIL import Image

    for step in (0, 2, 4):
        picture = np.asarray(Image.open(validated_run / "validation" / f"step-{step}" / "synthetic.png"))
        # two samples (--validation_images 2) of 4 panels each, every panel 192 px high
        assert picture.shape[0] == 2 * 192 and picture.shape[1] >= 4 * 192 and picture.std() > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((validated_run / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("val/synthetic/abs_rel")}
    values = logged(validated_run)
    assert scalars.keys() == values.keys()
    assert all(abs(scalars[s] - values[s]["values"]["synthetic"]["abs_rel"]) < 1e-6 for s in scalars)
    assert "val/time_s" in events.Tags()["scalars"]
    assert sorted(e.step for e in events.Images("val/synthetic")) == [0, 2, 4]


def test_a_resumed_run_keeps_a_better_best(validated_run, tiny_backbone_dir, scenes, held_out, tmp_path):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(validated_run, out, ignore=shutil.ignore_patterns("logs", "checkpoint-4"))
    recorded = json.loads((out / "best" / "best.json").read_text())
    better = {**recorded, "value": recorded["value"] / 10}  # a value no validation of this run reaches
    (out / "best" / "best.json").write_text(json.dumps(better))
    weights = load_file(out / "best" / "unet" / "diffusion_pytorch_model.safetensors")
    train_main(train_depth.RECIPE, flags(tiny_backbone_dir, scenes, out, *validating(held_out),
                                         "--resume_from_checkpoint", "latest", steps=6))
    assert json.loads((out / "best" / "best.json").read_text()) == better
    after = load_file(out / "best" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert sorted(logged(out)) == [0, 2, 4, 6]  # validated again from the resume point on, not at a resumed step 2


@pytest.mark.quick
@pytest.mark.parametrize("spec, message", [
    ("nyu_depth={held}", "unknown benchmark 'nyu_depth'"),
    ("synthetic={held}/missing", "no such file or folder"),
    ("synthetic={held}:0", "N (samples) must be at least 1"),
    ("synthetic", "expected NAME=PATH[:N]"),
])
def test_a_validation_set_that_does_not_exist_is_a_flag_error(held_out, tmp_path, spec, message):
    args = build_parser(train_depth.RECIPE).parse_args(
        ["--dataset", str(held_out), "--output_dir", str(tmp_path / "o"), "--pretrained_model_name_or_path",
         str(held_out), "--validation_dataset", spec.format(held=held_out)])
    with pytest.raises(FlagError, match="--validation_dataset") as info:
        validate_args(args, train_depth.RECIPE)
    assert message in str(info.value)


@pytest.mark.quick
def test_other_validation_flags_are_checked(held_out, tmp_path):
    base = ["--dataset", str(held_out), "--output_dir", str(tmp_path / "o"), "--pretrained_model_name_or_path",
            str(held_out)]
    for extra, message in ((["--validation_steps", "5"], "--validation_steps"),
                           (["--validation_dataset", f"synthetic={held_out}", "--best_metric", "nyu/abs_rel"],
                            "--best_metric"),
                           (["--validation_dataset", f"synthetic={held_out}", "--validation_steps", "0"],
                            "--validation_steps")):
        with pytest.raises(FlagError, match=message):
            validate_args(build_parser(train_depth.RECIPE).parse_args(base + extra), train_depth.RECIPE)


def test_an_unknown_metric_or_task_stops_before_the_model_loads(held_out, scenes, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()  # passes the flag check (a folder), would fail to load: the validation's error comes first
    with pytest.raises(SystemExit, match="reports abs_rel"):
        train_main(train_depth.RECIPE, flags(empty, scenes, tmp_path / "o", "--validation_dataset",
                                             f"synthetic={held_out}", "--best_metric", "synthetic/mean"))
    import train_normal

    with pytest.raises(SystemExit, match="a depth benchmark, but this run trains normal"):
        train_main(train_normal.RECIPE, flags(empty, scenes, tmp_path / "o", "--validation_dataset",
                                              f"synthetic={held_out}"))


def test_an_unreadable_sample_is_counted_not_fatal(tiny_backbone_dir, scenes, held_out, tmp_path, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="d3.train")
    held = Path(shutil.copytree(held_out, tmp_path / "held"))
    broken = sorted((held / "rgb").glob("*.png"))[1]
    broken.write_bytes(b"not a png")
    out = tmp_path / "run"
    train_main(train_depth.RECIPE, flags(tiny_backbone_dir, scenes, out, *validating(held), steps=2))
    summary = json.loads((out / "validation" / "step-2" / "synthetic" / "summary.json").read_text())
    assert summary["num_samples"] == N - 1 and summary["skipped_invalid"]["count"] == 1
    assert broken.name in caplog.text and f"synthetic ({N - 1}, 1 unreadable)" in caplog.text
    assert (out / "d3_config.json").exists()


def test_a_kill_during_validation_resumes_cleanly(validated_run, tiny_backbone_dir, scenes, held_out, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "D3_TEST_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "reliability_train_driver.py"),
                             "--kill_in_validation", "4", "--", *flags(tiny_backbone_dir, scenes, out,
                                                                       *validating(held_out))],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(logged(out)) == [0, 2] and not (out / "checkpoint-4").exists()
    train_main(train_depth.RECIPE, flags(tiny_backbone_dir, scenes, out, *validating(held_out),
                                         "--resume_from_checkpoint", "latest"))
    assert sorted(logged(out)) == [0, 2, 4]
    for step in (0, 2, 4):
        assert logged(out)[step]["values"] == logged(validated_run)[step]["values"]
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(validated_run / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "best" / "best.json").read_text()) == json.loads(
        (validated_run / "best" / "best.json").read_text())


def test_two_processes_log_what_one_does(tiny_backbone_dir, scenes, held_out, tmp_path):
    """Each rank scores its share (samples r, r+2, ... of 5: uneven), rank 0 gathers, logs and writes. The untrained
    step 0 is the same model in both runs: the same numbers; the trained step 4 is evaluate.py's number on the 2-process
    run's own export (the trained weights of 2 processes and 1 differ by the data-parallel rounding, which flips a
    pixel of a threshold metric now and then)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes, batch in ((2, 1), (1, 2)):
        out = tmp_path / f"p{processes}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     "29653"] if processes == 2 else [sys.executable])
        argv = flags(tiny_backbone_dir, scenes, out, *validating(held_out))
        argv[argv.index("--train_batch_size") + 1] = str(batch)
        proc = subprocess.run(launcher + [str(ROOT / "train_depth.py"), *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (proc.stdout + proc.stderr).count("validation at step 4 ") == 1  # one console line, rank 0's
        runs[processes] = logged(out)
        assert (out / "validation" / "step-4" / "synthetic.png").exists() and not list(out.rglob("*rank*"))
    assert sorted(runs[2]) == sorted(runs[1]) == [0, 2, 4]
    two, one = runs[2][0]["values"]["synthetic"], runs[1][0]["values"]["synthetic"]
    reference = evaluate_py(tmp_path / "p2", held_out, tmp_path / "eval")
    for metric in METRICS:
        assert abs(two[metric] - one[metric]) <= REL * abs(one[metric]), metric
        ours = runs[2][4]["values"]["synthetic"][metric]
        assert abs(ours - reference[metric]) <= REL * abs(reference[metric]), metric


@pytest.mark.quick
def test_the_picture_shows_a_perfect_prediction_as_a_black_error_map(held_out):
    """One row per pictured sample, input | prediction | ground truth | error; the error panel of a prediction equal
    to the ground truth is black (inferno's zero), that of the ground truth turned upside down is not (the perturbation)."""
    from d3.data.benchmarks import get_benchmark
    from d3.validation_pictures import ROW_HEIGHT, picture_of_set

    bench = get_benchmark("synthetic", held_out)

    class Replay:  # predicts, sample by sample in the set's order, the ground truth (or a transform of it)
        def __init__(self, transform):
            self.index, self.transform = 0, transform

        def predict(self, images, batch_size=1):
            gt = bench[self.index].gt.astype(np.float32)
            self.index += 1
            return [self.transform(gt)]

    perfect = picture_of_set(Replay(lambda gt: gt), bench, 2)
    flipped = picture_of_set(Replay(lambda gt: gt[::-1].copy()), bench, 2)
    assert perfect.shape[0] == 2 * ROW_HEIGHT and perfect.dtype == np.uint8 and perfect.shape[2] == 3
    panel = perfect.shape[1] // 4  # the held-out scenes share one size: four panels of equal width per row
    black = 4  # inferno's colour for an error of 0 is (0, 0, 4); invalid pixels are (0, 0, 0)
    assert perfect[:, 3 * panel:].max() <= black and perfect[:, :3 * panel].max() > 100
    assert flipped[:, 3 * panel:].max() > 100
    assert np.array_equal(perfect[:, :panel], flipped[:, :panel])  # the input panel does not depend on the prediction
