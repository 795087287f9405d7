"""`torchrun --nproc_per_node N evaluate.py`: process r of N scores samples r::N, rank 0 gathers every sample's
record and writes the same per_sample.csv, summary.json and table as one process; a sample that fails in any process
fails the run (every process exits non-zero, none waits); RANK/WORLD_SIZE without a rendezvous score their share."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from tests import benchmark_fixtures as F
from tests.test_sharded_infer import env, free_port

ROOT = Path(__file__).resolve().parents[1]
STEMS = tuple(f"{i:06d}" for i in range(5))  # 5 samples: shares of 3 and 2


def evaluate_cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(free_port())] if processes > 1 else [sys.executable])
    # timeout: a process left waiting for another would fail the test instead of hanging it
    return subprocess.run([*launcher, str(ROOT / "evaluate.py"), *args, "--no_progress", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def csv_samples(folder: Path) -> list[str]:
    with open(folder / "per_sample.csv", newline="") as f:
        return [row["sample"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    """nyu_normal's layout with 5 samples; the data root."""
    root = tmp_path_factory.mktemp("sharded-eval")
    F.write_normals(root / "data" / "nyuv2" / "test", stems=STEMS)
    return root / "data"


def rotated_predictions(data: Path, folder: Path) -> Path:
    """Each GT normal with x and y swapped: imperfect, different per sample, the same in every process."""
    folder.mkdir(parents=True)
    for gt in sorted((data / "nyuv2" / "test").glob("*_normal.npy")):
        np.save(folder / gt.name.replace("_normal.npy", "_img.npy"), np.load(gt)[..., [1, 0, 2]])
    return folder


def test_torchrun_two_processes_give_one_process_files_and_table(normals, tmp_path, tiny_normal_checkpoint, capsys):
    common = ["--dataset", "nyu_normal", "--data-root", str(normals), "--checkpoint", str(tiny_normal_checkpoint),
              "--pooling", "pixel"]  # pixels of all samples pooled: rank 0 needs every sample's errors, in order
    assert evaluate.main([*common, "--output", str(tmp_path / "one"), "--no_progress", "--device", "cpu"]) == 0
    one_table = capsys.readouterr().out

    two = evaluate_cli(*common, "--output", str(tmp_path / "two"), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    expected = files_of(tmp_path / "one")
    assert sorted(expected) == ["per_sample.csv", "summary.json"]
    assert files_of(tmp_path / "two") == expected  # byte for byte, and nothing else written (no per-rank files)
    summary = json.loads(expected["summary.json"])
    assert summary["num_samples"] == len(STEMS) and summary["protocol"]["pooling"] == "pixel"
    assert csv_samples(tmp_path / "two") == [f"{s}_img.png" for s in STEMS]  # each sample once, in dataset order
    # one table, printed once, the same as one process's
    table = [ln for ln in two.stdout.splitlines() if ln.startswith("NYUv2")]
    assert len(table) == 1 and table == [ln for ln in one_table.splitlines() if ln.startswith("NYUv2")]
    assert two.stdout.count("per-sample metrics:") == 1


def test_failure_in_one_process_fails_every_process(normals, tmp_path):
    """--predictions are sharded the same way; an unreadable prediction of sample 1 (rank 1's) without
    --allow_invalid: non-zero exit, the sample named once, no file; with it: the one-process summary."""
    preds = rotated_predictions(normals, tmp_path / "preds")
    (preds / f"{STEMS[1]}_img.npy").write_bytes(b"not an npy file")
    common = ["--dataset", "nyu_normal", "--data-root", str(normals), "--predictions", str(preds)]

    failed = evaluate_cli(*common, "--output", str(tmp_path / "failed"), processes=2)
    assert failed.returncode != 0, failed.stdout
    errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 1 of 2" in errors[0] and f"{STEMS[1]}_img.png" in errors[0], failed.stderr
    assert not (tmp_path / "failed").exists()

    assert evaluate.main([*common, "--allow_invalid", "--output", str(tmp_path / "one"), "--no_progress"]) == 0
    two = evaluate_cli(*common, "--allow_invalid", "--output", str(tmp_path / "two"), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_samples"] == len(STEMS) - 1 and list(summary["skipped_invalid"]["samples"]) == [
        f"{STEMS[1]}_img.png"]


def test_rank_and_world_size_without_a_rendezvous_score_their_share(normals, tmp_path, monkeypatch):
    """A batch-array job: each process writes its share's files under <output>/rank<r>_of_<n>/. The shares' sample
    counts (3 and 2) differ from the whole set's: a run whose gather dropped a process would be caught above."""
    preds = rotated_predictions(normals, tmp_path / "preds")
    common = ["--dataset", "nyu_normal", "--data-root", str(normals), "--predictions", str(preds), "--output",
              str(tmp_path / "out"), "--no_progress"]
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert evaluate.main([*common[:-3], "--output", str(tmp_path / "whole"), "--no_progress"]) == 0
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert evaluate.main(common) == 0
        share = tmp_path / "out" / f"rank{rank}_of_2"
        summary = json.loads((share / "summary.json").read_text())
        assert summary["share"]["rank"] == rank and summary["num_samples"] == len(STEMS[rank::2])
        shares.append(csv_samples(share))
    assert shares == [[f"{s}_img.png" for s in STEMS[r::2]] for r in (0, 1)]
    assert sorted(os.listdir(tmp_path / "out")) == ["rank0_of_2", "rank1_of_2"]
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["num_samples"] == len(STEMS) and "share" not in whole
    monkeypatch.setenv("RANK", "2")
    assert evaluate.main(common) == 2  # not a process of a 2-process run
