"""Data-parallel training on the CPU (gloo): `torchrun --nproc_per_node 2 train_depth.py` with `--train_batch_size 2`
reaches the weights, heads, timestep and logged losses of 1 process with `--train_batch_size 4` (with and without
gradient accumulation), each sample of an epoch on exactly one rank, only rank 0 writing; a rank killed mid-run and
a 2-process `--resume_from_checkpoint latest` reach the unbroken 2-process run's weights bitwise.

Adam divides each gradient by its own running magnitude, so with the default epsilon (1e-8) a near-zero gradient
whose fp32 rounding differs between a 2+2 all-reduce and one batch of 4 becomes a full-size, sign-flipped update
(measured: 0.9 % of the update). The runs here use `--adam_epsilon 1e-3`, which keeps updates proportional to the
gradients, so the comparison sees the data-parallel arithmetic rather than Adam's amplification of rounding.

The scenes are fully valid and of one size, so the authors' batch-pooled loss terms (pooled per process) equal their
pooled value over the global batch; with uneven valid pixels they would differ slightly, as they do for the authors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d3.data.mixing import OfficialMixSampler, RankSlice
from d3.data.synthetic import write_synthetic_dataset
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5  # logged losses, per step
STATE_TOL = 1e-6  # the whole trained state (student, heads, timestep), relative
UPDATE_TOL = 1e-3  # the runs' difference relative to how far the weights moved over the last two steps


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("dp") / "train", 16, 32, 32, seed=3, tasks=("depth",),
                                   invalid_fraction=0.0)


def _command(processes: int, port: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(ROOT / "train_depth.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port), str(ROOT / "train_depth.py")]


def _args(backbone: Path, data: Path, out: Path, batch: int, accumulation: int, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-4", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "7",
            "--adam_epsilon", "1e-3", "--log_history", str(out / "history.json")]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(processes: int, args: list[str], port: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(processes, port) + args, capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def trained_state(out: Path, step: int = 4) -> dict[str, torch.Tensor]:
    """Student, heads and timestep as accelerate saved them in checkpoint-N."""
    files = list((out / f"checkpoint-{step}" / "training_state").glob("model*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


@pytest.fixture(scope="module")
def two_process_run(tiny_backbone_dir, scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp2") / "run"
    proc = run(2, _args(tiny_backbone_dir, scenes, out, batch=2, accumulation=1), port=29641)
    # one final line for the run (the main process's), and logs that name no temporary checkpoint folder
    assert proc.stdout.count("model saved to ") == 1 and f"model saved to {out.resolve()}" in proc.stdout, proc.stdout
    assert ".tmp" not in proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_of_two_equal_one_process_of_four(tiny_backbone_dir, scenes, tmp_path, two_process_run,
                                                        accumulation):
    if accumulation == 1:
        two = two_process_run
    else:
        two = tmp_path / "two"
        run(2, _args(tiny_backbone_dir, scenes, two, batch=2, accumulation=accumulation), port=29642)
    one = tmp_path / "one"
    run(1, _args(tiny_backbone_dir, scenes, one, batch=4, accumulation=accumulation), port=0)
    ours, reference = trained_state(two), trained_state(one)
    assert set(ours) == set(reference)
    assert any(k.startswith("heads.") for k in ours) and "student_timestep" in ours
    flat = lambda state: torch.cat([state[k].flatten().double() for k in sorted(state)])  # noqa: E731
    assert rel_err(flat(ours), flat(reference)) <= STATE_TOL
    halfway = flat(load_file(next((one / "checkpoint-2" / "training_state").glob("model*"))))
    moved = (flat(reference) - halfway).norm()
    assert moved > 1e-6 * halfway.norm()  # training changed the weights: the comparison is not between untouched copies
    assert (flat(ours) - flat(reference)).norm() <= UPDATE_TOL * moved
    h2 = json.loads((two / "history.json").read_text())
    h1 = json.loads((one / "history.json").read_text())
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == [1, 2, 3, 4]
    for a, b in zip(h2, h1):
        for key in ("loss", "loss/align", "loss/mse", "loss/ssi", "loss/grad"):
            assert abs(a[key] - b[key]) <= REL_TOL * abs(b[key]), (key, a[key], b[key])
    # only rank 0 writes: one exported model, one history, no per-rank copies
    assert (two / "d3_config.json").exists() and not list(two.glob("*rank*"))


def test_each_sample_of_an_epoch_goes_to_exactly_one_rank():
    sampler = OfficialMixSampler([12, 8], [0.76, 0.24], batch_size=4, seed=1, names=["a", "b"])
    ranks = [RankSlice(OfficialMixSampler([12, 8], [0.76, 0.24], 4, 1, ["a", "b"]), r, 2) for r in range(2)]
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        global_batches = list(sampler)
        parts = [list(r) for r in ranks]
        assert all(len(p) == len(global_batches) == len(r) for p, r in zip(parts, ranks))
        for i, batch in enumerate(global_batches):
            assert parts[0][i] + parts[1][i] == batch  # rank 0 the first half, rank 1 the second
            assert not set(parts[0][i]) & set(parts[1][i])
        seen = [i for p in parts for batch in p for i in batch]
        assert sorted(seen) == sorted(set(seen)) and len(seen) == 20  # every sample once
    with pytest.raises(ValueError, match="does not split"):
        RankSlice(OfficialMixSampler([12], [1.0], 3), 0, 2)


def test_a_killed_rank_and_a_two_process_resume_reach_the_unbroken_weights(tiny_backbone_dir, scenes, tmp_path,
                                                                              two_process_run):
    out = tmp_path / "broken"
    args = _args(tiny_backbone_dir, scenes, out, batch=2, accumulation=1, steps=4)
    proc = subprocess.Popen(_command(2, 29643) + args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-2").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-f", "--", f"--output_dir {out}"], capture_output=True, text=True)
        pids = [int(p) for p in workers.stdout.split() if int(p) != proc.pid]
        assert pids, "no worker processes found"
        os.kill(max(pids), signal.SIGKILL)  # one rank dies mid-run; the launcher then stops the other
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (out / "checkpoint-4").exists()
    run(2, args + ["--resume_from_checkpoint", "latest"], port=29644)
    resumed, unbroken = trained_state(out), trained_state(two_process_run)
    assert set(resumed) == set(unbroken)
    for key in unbroken:
        assert torch.equal(resumed[key], unbroken[key]), key
