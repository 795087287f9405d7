"""evaluate.py on bad predictions and bad ground truth: an error naming the sample, or (--allow_invalid) the sample
counted, listed and left out of the average; never a silently wrong average and never a traceback."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from tests.helpers import PickleTrap

H, W = 12, 16
NAMES = [f"scene{i:04d}_00/color/{i:06d}.jpg" for i in range(6)]


def write_scannet(root: Path) -> dict[str, np.ndarray]:
    """Six ScanNet frames in the real layout (JPEG colour, uint16 millimetre depth PNG); returns GT depth in metres."""
    rng = np.random.default_rng(0)
    gt = {}
    for name in NAMES:
        rgb, depth = root / name, root / name.replace("/color/", "/depth/").replace(".jpg", ".png")
        rgb.parent.mkdir(parents=True, exist_ok=True)
        depth.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(rgb)
        mm = rng.integers(500, 9000, (H, W))
        Image.fromarray(mm.astype(np.uint16)).save(depth)
        gt[name] = (mm / 1000.0).astype(np.float32)
    return gt


def write_predictions(folder: Path, gt: dict[str, np.ndarray]) -> None:
    """Affine functions of the GT (perfect after least-squares alignment), except sample 1 which is noisy."""
    rng = np.random.default_rng(1)
    for i, (name, depth) in enumerate(gt.items()):
        pred = 0.5 * depth + 0.1
        if i == 1:
            pred = pred * rng.uniform(0.8, 1.2, pred.shape)
        path = folder / Path(name).with_suffix(".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, pred.astype(np.float32))


def npy(folder: Path, i: int) -> Path:
    return folder / Path(NAMES[i]).with_suffix(".npy")


def gt_png(root: Path, i: int) -> Path:
    return root / NAMES[i].replace("/color/", "/depth/").replace(".jpg", ".png")


def _missing(root, preds):
    npy(preds, 2).unlink()


def _wrong_shape(root, preds):
    np.save(npy(preds, 2), np.ones((H // 2, W // 2), np.float32))


def _nan(root, preds):
    pred = np.load(npy(preds, 2))
    pred[0, :3] = np.nan
    pred[1, 1] = np.inf
    np.save(npy(preds, 2), pred)


def _gt_undecodable(root, preds):
    gt_png(root, 2).write_text("this is not a PNG")


def _gt_truncated(root, preds):
    data = gt_png(root, 2).read_bytes()
    gt_png(root, 2).write_bytes(data[: len(data) // 2])


def _pred_truncated(root, preds):
    data = npy(preds, 2).read_bytes()
    npy(preds, 2).write_bytes(data[:100])


CASES = {  # breakage, what the error says (after "scannet sample <name>: ")
    "missing-prediction": (_missing, "prediction missing; looked for"),
    "wrong-shape": (_wrong_shape, "prediction has shape (6, 8), expected (12, 16)"),
    "nan": (_nan, "prediction has 4 non-finite values"),
    "gt-not-an-image": (_gt_undecodable, "cannot identify image file"),
    "gt-truncated": (_gt_truncated, "image file is truncated"),
    "prediction-truncated": (_pred_truncated, "cannot read prediction"),
}


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "scannet"
    gt = write_scannet(root)
    preds = tmp_path / "preds"
    write_predictions(preds, gt)
    return root, preds


def evaluate_cli(root: Path, preds: Path, out: Path, *extra: str) -> int:
    return evaluate.main(["--dataset", "scannet", "--data-root", str(root), "--predictions", str(preds),
                          "--output", str(out), "--no_progress", *extra])


@pytest.mark.quick
def test_intact_fixture_scores_every_sample(dataset, tmp_path):
    root, preds = dataset
    assert evaluate_cli(root, preds, tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_samples"] == 6 and summary["skipped_invalid"] == {"count": 0, "samples": {}}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_sample_is_an_error_naming_it(dataset, tmp_path, capsys, case):
    root, preds = dataset
    breakage, expected = CASES[case]
    breakage(root, preds)
    assert evaluate_cli(root, preds, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: scannet sample {NAMES[2]}: ") and expected in err, err
    assert not (tmp_path / "out" / "summary.json").exists(), "no summary from a run that stopped"


@pytest.mark.parametrize("case", list(CASES))
def test_allow_invalid_counts_lists_and_leaves_out(dataset, tmp_path, capsys, case):
    root, preds = dataset
    breakage, expected = CASES[case]
    breakage(root, preds)
    assert evaluate_cli(root, preds, tmp_path / "out", "--allow_invalid") == 0
    stdout = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    with open(tmp_path / "out" / "per_sample.csv") as f:
        rows = {r["sample"]: float(r["abs_rel"]) for r in csv.DictReader(f)}
    if case == "nan":  # non-finite values are scored as 0 and counted; the sample stays
        assert summary["invalid"]["samples_with_nonfinite"] == 1 and summary["invalid"]["nonfinite_values"] == 4
        assert summary["skipped_invalid"]["count"] == 0 and len(rows) == 6
        assert "1 with non-finite values scored as 0" in stdout
    else:  # left out of the average, named in summary.json and on stdout
        assert summary["skipped_invalid"]["count"] == 1
        reason = summary["skipped_invalid"]["samples"][NAMES[2]]
        assert NAMES[2] in reason and expected in reason
        assert NAMES[2] not in rows and len(rows) == 5
        assert f"skipped: {reason}" in stdout and "1 samples skipped as invalid" in stdout
    # the average is over exactly the scored samples: the perfect ones give 0, the noisy one its own error
    assert summary["num_samples"] == len(rows)
    assert summary["abs_rel"] == pytest.approx(np.mean(list(rows.values())), rel=1e-9, abs=1e-12)
    assert rows[NAMES[1]] > 1e-3 and all(v < 1e-5 for k, v in rows.items() if k not in (NAMES[1], NAMES[2]))


def test_every_sample_invalid_is_an_error_not_an_empty_average(dataset, tmp_path, capsys):
    root, preds = dataset
    for i in range(6):
        npy(preds, i).unlink()
    assert evaluate_cli(root, preds, tmp_path / "out", "--allow_invalid") == 1
    assert "scannet: no sample could be scored" in capsys.readouterr().err


def test_a_pickled_prediction_is_not_unpickled(dataset, tmp_path, capsys):
    root, preds = dataset
    marker = tmp_path / "code-ran"
    with open(npy(preds, 3), "wb") as f:
        np.save(f, np.array([PickleTrap(marker)], dtype=object), allow_pickle=True)
    assert evaluate_cli(root, preds, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"scannet sample {NAMES[3]}: cannot read prediction {npy(preds, 3)}" in err
    assert not marker.exists()
