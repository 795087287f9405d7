"""evaluate.py / d3.evaluation end to end on the benchmark fixtures."""

import csv
import json
import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

import evaluate
from d3 import metrics as M
from d3.data import benchmarks as B
from d3.evaluation import EvalOptions, run
from d3.prediction_files import EvaluationError, marigold_pred_name
from tests import benchmark_fixtures as F

ETH3D_KW = {"depth_shape": F.ETH3D_SHAPE}


def _ours(rel):
    return str(PurePosixPath(rel).with_suffix(".npy"))


def _marigold(name):
    mode = B.BENCHMARKS[name].pred_name_mode

    def fn(rel):
        p = PurePosixPath(rel)
        return str(p.parent / marigold_pred_name(p.name, mode))
    return fn


def _write_preds(pred_dir, expected, transform=lambda g: g, naming=_ours):
    for rel, (gt, _) in expected.items():
        path = Path(pred_dir) / naming(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, transform(gt).astype(np.float32))
    return pred_dir


def _eval(name, root, preds, out, **kw):
    """The CLI for every set; ETH3D goes through run() for the small fixture buffer."""
    if name == "eth3d":
        return run(name, root, EvalOptions(predictions=preds, output=out, progress=False, **kw),
                   reader_kwargs=ETH3D_KW)[name]
    args = ["--dataset", name, "--data-root", str(root), "--predictions", str(preds), "--output", str(out),
            "--no_progress"]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    assert evaluate.main(args) == 0
    return json.loads((Path(out) / "summary.json").read_text())


@pytest.fixture(scope="module")
def depth_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("depth")
    out = {}
    for name, write in F.WRITERS.items():
        root = base / name
        root.mkdir()
        out[name] = (root, write(root))
    return out


def _clip_error(name, expected):
    """AbsRel a perfect prediction still gets: DIODE's fixture has a valid GT pixel at 400 m,
    beyond the prediction clip of 350 m (the mask file alone decides validity)."""
    if name != "diode":
        return 0.0
    return float(np.mean([(50 / 400) / v.sum() if v[0, 0] else 0.0 for g, v in expected.values()]))


def _assert_perfect_depth(s, tol=1e-5):
    assert s["abs_rel"] < tol and s["sq_rel"] < tol and s["rmse"] < tol * 100 and s["silog"] < tol * 100
    assert s["delta1"] == s["delta2"] == s["delta3"] == 1.0


@pytest.mark.parametrize("name", list(F.WRITERS))
def test_depth_gt_affine_gt_and_marigold_naming(depth_sets, tmp_path, name):
    root, expected = depth_sets[name]
    if name == "diode":  # see _clip_error; check it, then score without that pixel
        s = _eval(name, root, _write_preds(tmp_path / "gt0", expected), tmp_path / "o0")
        assert _clip_error(name, expected) > 0
        assert s["abs_rel"] == pytest.approx(_clip_error(name, expected), rel=1e-4)
        expected = {k: (np.where(v & (g > 350), 350.0, g).astype(np.float32), v) for k, (g, v) in expected.items()}
        root = tmp_path / "diode_in_range"
        for k, (g, v) in expected.items():
            stem = k[:-4]
            for suffix in (".png", "_depth_mask.npy"):
                (root / stem).parent.mkdir(parents=True, exist_ok=True)
                (root / f"{stem}{suffix}").write_bytes((depth_sets[name][0] / f"{stem}{suffix}").read_bytes())
            np.save(root / f"{stem}_depth.npy", g[..., None])
    s = _eval(name, root, _write_preds(tmp_path / "gt", expected), tmp_path / "o1")
    _assert_perfect_depth(s)
    assert s["num_samples"] == len(expected) and s["dataset"] == name
    # an affinely transformed GT (as relative depth in [0, 1] would be) is perfect after alignment
    s_aff = _eval(name, root, _write_preds(tmp_path / "aff", expected, lambda g: (g - 0.3) / 97.0), tmp_path / "o2")
    _assert_perfect_depth(s_aff)
    # Marigold's own output naming scores identically to ours
    s_mg = _eval(name, root, _write_preds(tmp_path / "mg", expected, lambda g: (g - 0.3) / 97.0, _marigold(name)),
                 tmp_path / "o3")
    assert {k: s_mg[k] for k in M.DEPTH_METRICS} == {k: s_aff[k] for k in M.DEPTH_METRICS}


@pytest.mark.quick
def test_depth_summary_csv_and_table(depth_sets, tmp_path, capsys):
    root, expected = depth_sets["nyu"]
    preds = _write_preds(tmp_path / "p", expected, lambda g: np.sqrt(np.maximum(g, 0)))  # imperfect
    s = _eval("nyu", root, preds, tmp_path / "out")
    table = capsys.readouterr().out
    assert "AbsRel" in table and "δ1" in table and "fractions" in table and "NYU" in table
    assert f"{s['abs_rel']:.4f}" in table
    for key in M.DEPTH_METRICS:
        assert isinstance(s[key], float)
    proto = s["protocol"]
    assert proto["alignment"] == "least_square" and proto["alignment_max_res"] is None
    assert "eigen" in proto["crop"] and proto["protocol_processing_res"] == 0
    assert s["predictions"] == str(preds) and s["checkpoint"] is None
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_sample.csv")))
    assert [r["sample"] for r in rows] == list(expected)
    assert float(rows[0]["abs_rel"]) == pytest.approx(s["abs_rel"])
    assert {"scale", "shift"} <= set(rows[0])
    # metric recomputed by hand from the GT, aligned with numpy lstsq, matches
    gt, valid = expected["test/bathroom_0001/rgb_0001.png"]
    p = np.sqrt(np.maximum(gt, 0)).astype(np.float32)
    A = np.stack([p[valid], np.ones(valid.sum(), np.float32)], -1)
    sc, sh = np.linalg.lstsq(A, gt[valid], rcond=None)[0]
    al = np.clip(np.clip(p * sc + sh, 1e-3, 10), 1e-6, None)
    assert s["abs_rel"] == pytest.approx(float(np.mean(np.abs(al[valid] - gt[valid]) / gt[valid])), rel=1e-5)


def test_eth3d_uses_max_res_and_overrides(depth_sets, tmp_path):
    root, expected = depth_sets["eth3d"]
    preds = _write_preds(tmp_path / "p", expected, lambda g: np.sqrt(g) + 0.1 * np.sin(np.arange(g.size)).reshape(g.shape))
    opts = EvalOptions(predictions=preds, progress=False)
    s = run("eth3d", root, replace(opts, output=tmp_path / "a"), reader_kwargs=ETH3D_KW)["eth3d"]
    assert s["protocol"]["alignment_max_res"] == 1024  # 36 columns < 1024: a no-op here
    s2 = run("eth3d", root, replace(opts, output=tmp_path / "b", alignment_max_res=12),
             reader_kwargs=ETH3D_KW)["eth3d"]
    assert s2["protocol"]["alignment_max_res"] == 12 and s2["abs_rel"] != s["abs_rel"]
    s3 = run("eth3d", root, replace(opts, output=tmp_path / "c", alignment="least_square_disparity"),
             reader_kwargs=ETH3D_KW)["eth3d"]
    assert s3["protocol"]["alignment"] == "least_square_disparity"


def test_all_depth_table(depth_sets, tmp_path, capsys):
    base = tmp_path / "data"
    (base / "nyuv2").mkdir(parents=True)
    F.make_tar(depth_sets["nyu"][0], base / "nyuv2" / "nyu_labeled_extracted.tar")
    os.symlink(depth_sets["scannet"][0], base / "scannet")
    (base / "diode").mkdir()
    os.symlink(depth_sets["diode"][0], base / "diode" / "val")
    preds = tmp_path / "preds"
    for name in ("nyu", "scannet", "diode"):
        _write_preds(preds / name, depth_sets[name][1], lambda g: 2 * g + 1)
    assert evaluate.main(["--dataset", "all_depth", "--data-root", str(base), "--predictions", str(preds),
                          "--output", str(tmp_path / "out"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("Method"))
    assert header.index("KITTI") < header.index("NYU") < header.index("ScanNet") < header.index("DIODE") \
        < header.index("ETH3D")  # the paper's Table 1 order
    assert "kitti: not found" in out
    for name in ("nyu", "scannet", "diode"):
        s = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        if name == "diode":
            assert s["abs_rel"] == pytest.approx(_clip_error(name, depth_sets[name][1]), rel=1e-4)
        else:
            _assert_perfect_depth(s)


# ----------------------------------------------------------------------------------------------
# Normals, matting, segmentation
# ----------------------------------------------------------------------------------------------

@pytest.mark.quick
def test_normals_gt_layouts_and_pooling(tmp_path, capsys):
    exp = F.write_normals(tmp_path / "nyuv2" / "test")
    preds = _write_preds(tmp_path / "p", exp)
    s = _eval("nyu_normal", tmp_path, preds, tmp_path / "o")
    assert s["mean"] < 0.05 and s["median"] < 0.05 and s["a5"] == 100.0 and s["a30"] == 100.0
    assert s["protocol"]["pooling"] == "image"
    assert "Mean" in capsys.readouterr().out
    # (3, H, W) as Marigold writes them, scaled (non-unit) vectors: same scores
    chw = _write_preds(tmp_path / "chw", exp, lambda n: 3 * n.transpose(2, 0, 1))
    s2 = _eval("nyu_normal", tmp_path, chw, tmp_path / "o2")
    assert s2["a5"] == 100.0 and s2["mean"] < 0.05
    # a rotated prediction: per-image vs pooled
    rot = _write_preds(tmp_path / "rot", exp, lambda n: n[..., [1, 0, 2]])
    img = _eval("nyu_normal", tmp_path, rot, tmp_path / "o3")
    pix = _eval("nyu_normal", tmp_path, rot, tmp_path / "o4", pooling="pixel")
    assert pix["protocol"]["pooling"] == "pixel"
    errs = [M.angular_errors(n[..., [1, 0, 2]], n).numpy() for n, _ in exp.values()]
    assert pix["mean"] == pytest.approx(float(np.concatenate(errs).mean()), rel=1e-5)
    assert img["mean"] == pytest.approx(np.mean([round(float(e.mean()), 4) for e in errs]), abs=1e-4)


def test_all_normal_table(tmp_path, capsys):
    F.write_normals(tmp_path / "data" / "nyuv2" / "test")
    F.write_normals(tmp_path / "data" / "ibims" / "ibims", stems=("corridor_01",))
    preds = tmp_path / "p"
    for name, rel in (("nyu_normal", "nyuv2/test"), ("ibims", "ibims/ibims")):
        for f in (tmp_path / "data" / rel).glob("*_normal.npy"):
            (preds / name).mkdir(parents=True, exist_ok=True)
            np.save(preds / name / f.name.replace("_normal.npy", "_img.npy"), np.load(f))
    assert evaluate.main(["--dataset", "all_normal", "--data-root", str(tmp_path / "data"), "--predictions",
                          str(preds), "--output", str(tmp_path / "o"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("Method"))
    assert header.index("NYUv2") < header.index("iBims-1") < header.index("OASIS")
    assert "11.25°" in out and "degrees" in out
    assert json.loads((tmp_path / "o" / "ibims" / "summary.json").read_text())["a11_25"] == 100.0


@pytest.mark.quick
def test_p3m_gt_as_npy_png_and_flat_names(tmp_path, capsys):
    root = tmp_path / "P3M-500-NP"
    exp = F.write_p3m(root)
    for i, (rel, (alpha, _)) in enumerate(exp.items()):
        stem = PurePosixPath(rel).stem
        if i == 0:  # our naming, float .npy
            (tmp_path / "ours" / "original_image").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "ours" / "original_image" / f"{stem}.npy", alpha)
        else:
            (tmp_path / "ours" / "original_image").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(alpha * 255).astype(np.uint8)).save(tmp_path / "ours" / "original_image" / f"{stem}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)  # P3M's own test_result_dir naming
        Image.fromarray(np.round(alpha * 65535).astype(np.uint16)).save(tmp_path / "flat" / f"{stem}.png")
    for d in ("ours", "flat"):
        s = _eval("p3m", tmp_path, tmp_path / d, tmp_path / f"o_{d}")
        assert all(s[k] == pytest.approx(0, abs=1e-9) for k in M.MATTING_METRICS + M.MATTING_TRIMAP_METRICS), d
    assert "SAD" in capsys.readouterr().out
    # an imperfect prediction: the summary is the mean of per-image P3M metrics
    for rel, (alpha, trimap) in exp.items():
        np.save(tmp_path / "ours" / "original_image" / f"{PurePosixPath(rel).stem}.npy", alpha * 0.8)
    s = _eval("p3m", tmp_path, tmp_path / "ours", tmp_path / "o3")
    ref = [M.matting_metrics(a * 0.8, a, t) for a, t in exp.values()]
    for k in M.MATTING_METRICS:
        assert s[k] == pytest.approx(np.mean([r[k] for r in ref]))


@pytest.mark.quick
def test_segmentation_folder(tmp_path, capsys):
    exp = F.write_segmentation_folder(tmp_path / "task")
    (tmp_path / "p").mkdir()
    for rel, (mask, _) in exp.items():
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "p" / f"{PurePosixPath(rel).stem}.png")
    s = _eval("folder", tmp_path / "task", tmp_path / "p", tmp_path / "o")
    assert s["iou"] == s["dice"] == s["pixel_acc"] == 1.0
    assert "IoU" in capsys.readouterr().out
    first = next(iter(exp))
    np.save(tmp_path / "p" / (PurePosixPath(first).stem + ".npy"), np.zeros(exp[first][0].shape))  # .npy wins
    s = _eval("folder", tmp_path / "task", tmp_path / "p", tmp_path / "o2")
    assert s["iou"] == pytest.approx(0.5) and s["pixel_acc"] < 1.0


# ----------------------------------------------------------------------------------------------
# Errors that name the sample
# ----------------------------------------------------------------------------------------------

def test_errors_name_the_sample(depth_sets, tmp_path, capsys):
    root, expected = depth_sets["scannet"]
    name0, name1 = list(expected)
    preds = _write_preds(tmp_path / "p", {name0: expected[name0]})
    args = ["--dataset", "scannet", "--data-root", str(root), "--output", str(tmp_path / "o"), "--no_progress"]
    assert evaluate.main(args + ["--predictions", str(preds)]) == 1
    err = capsys.readouterr().err
    assert "prediction missing" in err and name1 in err and "pred_001200.npy" in err
    # wrong shape
    _write_preds(preds, {name1: (np.zeros((10, 10), np.float32), None)})
    assert evaluate.main(args + ["--predictions", str(preds)]) == 1
    err = capsys.readouterr().err
    assert name1 in err and "(10, 10)" in err and "(48, 64)" in err
    # non-finite values: an error, or counted with --allow_invalid
    bad = expected[name1][0].copy()
    bad[0, :5] = np.nan
    bad[1, 0] = np.inf
    _write_preds(preds, {name1: (bad, None)})
    assert evaluate.main(args + ["--predictions", str(preds)]) == 1
    err = capsys.readouterr().err
    assert name1 in err and "6 non-finite" in err
    assert evaluate.main(args + ["--predictions", str(preds), "--allow_invalid"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["invalid"] == {"allow_invalid": True, "samples_with_nonfinite": 1, "nonfinite_values": 6,
                            "skipped_empty_mask": 0}
    # data root missing (a usage error, before anything is read) / empty
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--dataset", "nyu", "--data-root", str(tmp_path / "none"), "--predictions", str(preds)])
    assert exit_.value.code == 2 and "--data-root" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate.main(["--dataset", "nyu", "--data-root", str(tmp_path / "empty"), "--predictions", str(preds)]) == 1
    assert "no samples found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --checkpoint
# ----------------------------------------------------------------------------------------------

class _FakePredictor:
    """Stands in for D3Predictor: returns an affine function of the image's mean colour."""

    task = "depth"
    processing_res = 768

    def __init__(self):
        self.calls = []

    def predict(self, images, processing_res=None, **kwargs):
        self.calls.append((len(images), processing_res))
        return [img.astype(np.float32).mean(-1) / 255.0 for img in images]


@pytest.mark.quick
def test_the_options_default_as_the_flags_do(tmp_path):
    """EvalOptions() is what evaluate.py runs without optional flags, so a program and the command agree."""
    args = evaluate.build_parser().parse_args(["--dataset", "nyu", "--data-root", str(tmp_path), "--predictions", "p"])
    assert evaluate.eval_options(args) == EvalOptions(predictions="p")
    args = evaluate.build_parser().parse_args(["--dataset", "nyu", "--data-root", str(tmp_path), "--checkpoint", "c",
                                               "--alignment_max_res", "0", "--no_progress"])
    assert evaluate.eval_options(args) == EvalOptions(checkpoint="c", alignment_max_res=0, progress=False)


def test_in_memory_predictor_path(depth_sets, tmp_path):
    root, expected = depth_sets["scannet"]
    fake = _FakePredictor()
    s = run("scannet", root, EvalOptions(checkpoint="fake-ckpt", output=tmp_path / "o",
                                         save_predictions=tmp_path / "saved", batch_size=2, progress=False),
            predictor=fake)["scannet"]
    assert fake.calls == [(2, None)]
    assert s["checkpoint"] == "fake-ckpt" and s["predictions"] is None
    assert s["protocol"]["processing_res"] == 768  # the checkpoint's default, recorded
    # the saved predictions score identically through --predictions
    s2 = _eval("scannet", root, tmp_path / "saved", tmp_path / "o2")
    assert {k: s2[k] for k in M.DEPTH_METRICS} == {k: s[k] for k in M.DEPTH_METRICS}
    opts = EvalOptions(checkpoint="x", progress=False)
    run("scannet", root, replace(opts, output=tmp_path / "o3", processing_res=512), predictor=fake)
    assert fake.calls[-1] == (1, 512)
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["protocol"]["processing_res"] == 512
    run("scannet", root, replace(opts, output=tmp_path / "o4", processing_res="protocol"), predictor=fake)
    assert fake.calls[-1] == (1, 0)  # Marigold's ScanNet setting: native resolution
    fake.task = "normal"
    with pytest.raises(EvaluationError, match="scannet is a depth benchmark but the checkpoint predicts 'normal'"):
        run("scannet", root, replace(opts, output=tmp_path / "o5"), predictor=fake)


@pytest.mark.quick
def test_checkpoint_end_to_end_tiny_backbone(depth_sets, tmp_path, request):
    pytest.importorskip("d3.predictor")
    try:
        ckpt = request.getfixturevalue("tiny_depth_checkpoint")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_depth_checkpoint fixture is not available")
    root, expected = depth_sets["scannet"]
    assert evaluate.main(["--dataset", "scannet", "--data-root", str(root), "--checkpoint", str(ckpt),
                          "--output", str(tmp_path / "o"), "--save_predictions", str(tmp_path / "saved"),
                          "--device", "cpu", "--no_progress"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["num_samples"] == len(expected) and s["checkpoint"] == str(ckpt)
    assert all(np.isfinite(s[k]) for k in M.DEPTH_METRICS)
    assert s["protocol"]["processing_res"] is not None
    for rel, (gt, _) in expected.items():
        saved = np.load(tmp_path / "saved" / _ours(rel))
        assert saved.shape == gt.shape and saved.dtype == np.float32
