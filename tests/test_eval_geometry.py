"""evaluate.py --checkpoint predicts in the paper's geometry (squash) unless told otherwise, and infer.py's output
folder scores through evaluate.py --predictions exactly as the same predictions made in memory."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

import evaluate
import infer
from d3 import metrics as M
from d3.data import benchmarks as B
from d3.evaluation import EvalOptions, run
from d3.prediction_files import EvaluationError, prediction_candidates
from d3.checkpoint import RESIZE_MODES
from d3.predictor import D3Predictor
from tests import benchmark_fixtures as F

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # in-memory and infer.py's predictions bit-identical

KEYS = {"depth": M.DEPTH_METRICS, "normal": M.NORMAL_METRICS, "matting": M.MATTING_METRICS + M.MATTING_TRIMAP_METRICS}


def _evaluate(*args: str) -> dict:
    out = None
    for i, a in enumerate(args):
        if a == "--output":
            out = Path(args[i + 1])
    assert evaluate.main([*args, "--no_progress"]) == 0
    return json.loads((out / "summary.json").read_text())


def _checkpoint_eval(name, root, ckpt, out, *extra):
    return _evaluate("--dataset", name, "--data-root", str(root), "--checkpoint", str(ckpt), "--output", str(out),
                     "--device", "cpu", *extra)


def _predictions_eval(name, root, preds, out):
    return _evaluate("--dataset", name, "--data-root", str(root), "--predictions", str(preds), "--output", str(out))


@pytest.fixture(scope="module")
def scannet(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet") / "scannet"
    root.mkdir()
    F.write_scannet(root)  # 48x64 frames: a squash to 64x64 and the aspect-kept 48x64 differ
    return root


def test_the_resize_modes_are_the_predictors():
    assert set(evaluate.RESIZE_MODES) == set(RESIZE_MODES)


def test_checkpoint_squashes_by_default_and_keeps_the_aspect_when_asked(scannet, tiny_depth_checkpoint, tmp_path):
    predictor = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu")
    assert predictor.config.resize_mode == "keep_aspect" and predictor.config.processing_res == 64
    bench = B.ScanNet(scannet)
    samples = [bench[i] for i in range(len(bench))]
    by_hand = {mode: {s.name: predictor.predict([s.rgb], resize_mode=mode)[0] for s in samples}
               for mode in ("squash", "keep_aspect")}
    assert all(np.abs(by_hand["squash"][s.name] - by_hand["keep_aspect"][s.name]).max() > 1e-3 for s in samples)

    runs = {"squash": [], "keep_aspect": ["--resize_mode", "keep_aspect"]}
    for mode, extra in runs.items():
        saved = tmp_path / f"saved_{mode}"
        s = _checkpoint_eval("scannet", scannet, tiny_depth_checkpoint, tmp_path / mode, "--save_predictions",
                             str(saved), *extra)
        assert s["protocol"]["resize_mode"] == mode and s["protocol"]["processing_res"] == 64
        assert ("64x64" in s["protocol"]["geometry"]) == (mode == "squash")
        for name, pred in by_hand[mode].items():
            np.testing.assert_array_equal(np.load(saved / PurePosixPath(name).with_suffix(".npy")), pred)
        # and the numbers are those of the hand-made predictions scored from files
        hand = tmp_path / f"hand_{mode}"
        for name, pred in by_hand[mode].items():
            (hand / name).parent.mkdir(parents=True, exist_ok=True)
            np.save(hand / PurePosixPath(name).with_suffix(".npy"), pred)
        from_files = _predictions_eval("scannet", scannet, hand, tmp_path / f"files_{mode}")
        assert {k: from_files[k] for k in M.DEPTH_METRICS} == {k: s[k] for k in M.DEPTH_METRICS}
        assert from_files["protocol"]["resize_mode"] is None

    # --official_preprocess is the squash (at 768 unless --processing_res says otherwise; 64 keeps the test fast)
    s = _checkpoint_eval("scannet", scannet, tiny_depth_checkpoint, tmp_path / "official", "--official_preprocess",
                         "--processing_res", "64", "--save_predictions", str(tmp_path / "saved_official"))
    assert s["protocol"]["resize_mode"] == "squash"
    for name, pred in by_hand["squash"].items():
        np.testing.assert_array_equal(np.load(tmp_path / "saved_official" / PurePosixPath(name).with_suffix(".npy")),
                                      pred)


def test_geometry_flags_that_cannot_apply_are_refused(scannet, tmp_path, capsys):
    base = ["--dataset", "scannet", "--data-root", str(scannet), "--output", str(tmp_path / "o"), "--no_progress"]
    for extra, message in ((["--predictions", str(tmp_path), "--resize_mode", "squash"], "--resize_mode needs"),
                           (["--predictions", str(tmp_path), "--official_preprocess"], "--official_preprocess needs"),
                           (["--checkpoint", "x", "--official_preprocess", "--resize_mode", "keep_aspect"],
                            "squashes to a square")):
        with pytest.raises(SystemExit) as err:
            evaluate.main(base + extra)
        assert err.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ infer -> evaluate
def _infer(input_dir, ckpt, out, *extra):
    assert infer.main(["--input", str(input_dir), "--checkpoint", str(ckpt), "--output", str(out), "--device", "cpu",
                       "--workers", "1", *extra]) == 0


@pytest.mark.parametrize("mode", ["squash", "keep_aspect"])
def test_infer_output_scores_as_evaluate_checkpoint_depth(scannet, tiny_depth_checkpoint, tmp_path, mode):
    # the matching pairs: evaluate's default (squash) with infer --resize_mode squash; infer's default (keep_aspect)
    # with evaluate --resize_mode keep_aspect
    squash = ["--resize_mode", "squash"] if mode == "squash" else []
    _infer(scannet, tiny_depth_checkpoint, tmp_path / "pred", *squash)
    assert (tmp_path / "pred" / "scene0011_00" / "color" / "000100_depth.npy").is_file()  # mirrors the data folder
    from_infer = _predictions_eval("scannet", scannet, tmp_path / "pred", tmp_path / "files")
    in_memory = _checkpoint_eval("scannet", scannet, tiny_depth_checkpoint, tmp_path / "mem",
                                 *(["--resize_mode", "keep_aspect"] if mode == "keep_aspect" else []))
    assert in_memory["protocol"]["resize_mode"] == mode
    assert {k: from_infer[k] for k in KEYS["depth"]} == {k: in_memory[k] for k in KEYS["depth"]}
    assert from_infer["num_samples"] == in_memory["num_samples"] == 2


@pytest.mark.quick
def test_infer_output_scores_as_evaluate_checkpoint_normals(tiny_normal_checkpoint, tmp_path):
    root = tmp_path / "nyu_normal"
    F.write_normals(root)  # <stem>_img.png -> infer writes <stem>_img_normal.npy
    _infer(root, tiny_normal_checkpoint, tmp_path / "pred")  # infer's default geometry: keep_aspect
    assert (tmp_path / "pred" / "000000_img_normal.npy").is_file()
    from_infer = _predictions_eval("nyu_normal", root, tmp_path / "pred", tmp_path / "files")
    in_memory = _checkpoint_eval("nyu_normal", root, tiny_normal_checkpoint, tmp_path / "mem", "--resize_mode",
                                 "keep_aspect")
    assert {k: from_infer[k] for k in KEYS["normal"]} == {k: in_memory[k] for k in KEYS["normal"]}
    assert from_infer["num_samples"] == 2


@pytest.mark.parametrize("where", ["root", "images"])
def test_infer_output_scores_as_evaluate_checkpoint_matting(tiny_matting_checkpoint, tmp_path, where):
    root = tmp_path / "P3M-500-NP"
    F.write_p3m(root)
    # infer on the dataset folder mirrors original_image/; on the image folder it writes flat names
    _infer(root if where == "root" else root / "original_image", tiny_matting_checkpoint, tmp_path / "pred",
           "--resize_mode", "squash")
    sub = "original_image/" if where == "root" else ""
    assert (tmp_path / "pred" / f"{sub}p_0a1b2c3d_alpha_16bit.png").is_file()
    from_infer = _predictions_eval("p3m", root, tmp_path / "pred", tmp_path / "files")
    in_memory = _checkpoint_eval("p3m", root, tiny_matting_checkpoint, tmp_path / "mem", "--save_predictions",
                                 str(tmp_path / "saved"))
    assert in_memory["protocol"]["resize_mode"] == "squash" and from_infer["num_samples"] == 2
    # the same alpha, rounded to 1/65535 in the 16-bit PNG (measured: metrics within 3e-6 relative)
    from PIL import Image

    for saved in (tmp_path / "saved" / "original_image").glob("*.npy"):
        png = np.asarray(Image.open(tmp_path / "pred" / f"{sub}{saved.stem}_alpha_16bit.png"))
        np.testing.assert_array_equal(png, np.round(np.load(saved) * 65535).astype(np.uint16))
    for k in KEYS["matting"]:
        assert from_infer[k] == pytest.approx(in_memory[k], rel=2e-5, abs=1e-9), k


@pytest.mark.quick
def test_prediction_lookup_order(tmp_path):
    root = tmp_path / "P3M-500-NP"
    F.write_p3m(root)
    p3m = B.P3M500NP(root)
    assert prediction_candidates(p3m, "original_image/a.jpg") == [
        "original_image/a_alpha_16bit.png", "original_image/a.npy", "original_image/a.png",
        "original_image/a_alpha.png", "a_alpha_16bit.png", "a.npy", "a.png", "a_alpha.png"]
    scannet = tmp_path / "scannet"
    F.write_scannet(scannet)
    assert prediction_candidates(B.ScanNet(scannet), "s/color/000100.jpg") == [
        "s/color/000100_depth.npy", "s/color/000100.npy", "s/color/pred_000100.npy"]
    normals = tmp_path / "normals"
    F.write_normals(normals)
    assert prediction_candidates(B.NYUv2Normals(normals), "000000_img.png") == ["000000_img_normal.npy",
                                                                                  "000000_img.npy"]
    # only the 8-bit alpha present (16-bit one deleted): it is used
    exp = F.write_p3m(root)
    preds = tmp_path / "alpha8"
    preds.mkdir()
    from PIL import Image

    for rel, (alpha, _) in exp.items():
        Image.fromarray(np.round(alpha * 255).astype(np.uint8)).save(preds / f"{PurePosixPath(rel).stem}_alpha.png")
    s = run("p3m", root, EvalOptions(predictions=preds, output=tmp_path / "o", progress=False),
            print_fn=lambda *a: None)["p3m"]
    assert s["mad"] == pytest.approx(0, abs=1e-12)


def test_the_dataset_folder_is_not_taken_for_predictions(tmp_path):
    root = tmp_path / "diode"
    root.mkdir()
    F.write_diode(root)  # X.png next to its GT X_depth.npy: infer.py's depth name
    with pytest.raises(EvaluationError, match=r"is the ground truth itself; --predictions must be a folder of "
                                              r"predictions, not the dataset"):
        run("diode", root, EvalOptions(predictions=root, output=tmp_path / "o", progress=False),
            print_fn=lambda *a: None)
