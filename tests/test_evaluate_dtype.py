"""evaluate.py --dtype: the checkpoint's precision is a choice (fp32 on the CPU by default, bf16 on CUDA as the
paper's inference) and summary.json says which one made the numbers, and on which device."""

from __future__ import annotations

import json

import pytest

import evaluate
from d3 import metrics as M
from tests import benchmark_fixtures as F
from tests.test_cli_fast import run_cli


@pytest.fixture(scope="module")
def scannet(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    F.WRITERS["scannet"](root)
    return root


def summary(root, ckpt, out, *extra):
    assert evaluate.main(["--dataset", "scannet", "--data-root", str(root), "--checkpoint", str(ckpt),
                          "--output", str(out), "--device", "cpu", "--no_progress", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_summary_records_dtype_and_device_and_bf16_differs_only_slightly(scannet, tiny_depth_checkpoint, tmp_path):
    default = summary(scannet, tiny_depth_checkpoint, tmp_path / "default")
    assert default["dtype"] == "fp32" and default["device"] == "cpu"  # the CPU's default
    bf16 = summary(scannet, tiny_depth_checkpoint, tmp_path / "bf16", "--dtype", "bf16")
    assert bf16["dtype"] == "bf16" and bf16["device"] == "cpu"
    fp32 = summary(scannet, tiny_depth_checkpoint, tmp_path / "fp32", "--dtype", "fp32")
    assert fp32["dtype"] == "fp32"
    assert {k: fp32[k] for k in M.DEPTH_METRICS} == {k: default[k] for k in M.DEPTH_METRICS}
    # bf16 really ran (the numbers move) and only by its rounding (the tiny net: a few % of AbsRel, measured)
    assert any(bf16[k] != fp32[k] for k in M.DEPTH_METRICS)
    assert abs(bf16["abs_rel"] - fp32["abs_rel"]) <= 0.1 * fp32["abs_rel"]
    assert abs(bf16["delta1"] - fp32["delta1"]) <= 0.1


def test_saved_predictions_record_no_dtype(scannet, tiny_depth_checkpoint, tmp_path):
    made = summary(scannet, tiny_depth_checkpoint, tmp_path / "o", "--save_predictions", str(tmp_path / "saved"))
    assert made["dtype"] == "fp32"
    assert evaluate.main(["--dataset", "scannet", "--data-root", str(scannet), "--predictions", str(tmp_path / "saved"),
                          "--output", str(tmp_path / "p"), "--no_progress"]) == 0
    scored = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert scored["dtype"] is None and scored["device"] is None  # made elsewhere: unknown


@pytest.mark.quick
@pytest.mark.parametrize("extra, words", [(["--predictions", "PRED", "--dtype", "bf16"], "--dtype needs --checkpoint"),
                                          (["--checkpoint", "CKPT", "--dtype", "fp8"], "--dtype")])
def test_a_bad_dtype_stops_before_anything_loads(tmp_path, extra, words):
    (tmp_path / "PRED").mkdir()
    (tmp_path / "CKPT").mkdir()
    extra = [str(tmp_path / e) if e in ("PRED", "CKPT") else e for e in extra]
    proc, _, heavy = run_cli("evaluate.py", "--dataset", "nyu", "--data-root", str(tmp_path), *extra)
    assert proc.returncode == 2 and heavy == []
    assert words in proc.stderr.strip().splitlines()[-1]
