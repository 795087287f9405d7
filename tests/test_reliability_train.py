"""Training survives what real runs meet: SIGKILL (mid-step and mid-checkpoint), non-finite losses, bad samples.

A killed run resumed with --resume_from_checkpoint latest reaches bitwise the weights of an unbroken run of the same
seed (optimizer, LR schedule, RNG, learned timestep and data position restored). The kills are real SIGKILLs of real
processes (tests/reliability_train_driver.py); everything else runs in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_depth
from d3.checkpoint import CheckpointError
from d3.predictor import D3Predictor
from d3.training import build_parser, train
from d3.training_checkpoints import resolve_resume

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "reliability_train_driver.py"
# 6 samples, batch 2: 3 batches per epoch; 2 micro-batches per update; 4 updates = 8 micro-steps (2 epochs and a
# bit), checkpoints at steps 2 and 4. Resuming from checkpoint-2 starts in epoch 1 after skipping its first batch.
STEPS = 4


def flags(data: Path, backbone: Path, output: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(output),
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_train_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_scheduler", "linear",
            "--lr_warmup_steps", "1", "--checkpointing_steps", "2", "--report_to", "none",
            "--dataloader_num_workers", "0", "--seed", "3", *extra]


def drive(*args: str) -> subprocess.CompletedProcess:
    """A training process that SIGKILLs itself; same thread count as this one, so the arithmetic is identical."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "D3_TEST_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from d3.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("rel-train") / "data", 6, 32, 32, seed=1,
                                   tasks=("depth",))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_data, tiny_backbone_dir) -> Path:
    """The unbroken run every interrupted one must reproduce (in this process: imports are the slow part)."""
    out = tmp_path_factory.mktemp("rel-train") / "reference"
    run_in_process(flags(small_data, tiny_backbone_dir, out))
    return out


def run_in_process(argv: list[str]):
    return train(build_parser(train_depth.RECIPE).parse_args(argv), train_depth.RECIPE)


def assert_same_training_state(a: Path, b: Path) -> None:
    """Student, heads and learned timestep bitwise; optimizer moments, LR schedule, counters and data position too."""
    wa, wb = load_file(a / "training_state" / "model.safetensors"), load_file(b / "training_state" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 100
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert float(wa["student_timestep"]) != 261.0, "the timestep is learned (it moved)"
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    oa, ob = load(a / "training_state" / "optimizer.bin"), load(b / "training_state" / "optimizer.bin")
    for sa, sb in zip(oa["state"].values(), ob["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load(a / "training_state" / "scheduler.bin") == load(b / "training_state" / "scheduler.bin")
    ta = json.loads((a / "training_state" / "trainer_state.json").read_text())
    tb = json.loads((b / "training_state" / "trainer_state.json").read_text())
    assert ta == tb and ta["global_step"] == STEPS and ta["micro_step"] == 2 * STEPS
    from accelerate.utils.other import load as load_rng  # accelerate's weights-only loader (numpy RNG allowed)

    ra, rb = (load_rng(p / "training_state" / "random_states_0.pkl") for p in (a, b))
    assert torch.equal(ra["torch_manual_seed"], rb["torch_manual_seed"]) and ra["random_state"] == rb["random_state"]
    assert all(np.array_equal(x, y) for x, y in zip(ra["numpy_random_seed"], rb["numpy_random_seed"]))
    assert ra["step"] == rb["step"]  # accelerate's micro-step counter (gradient accumulation phase)
    # the runs' final exports (in the output folders: the last checkpoint holds no inference folder)
    ua, ub = load_file(a.parent / "unet" / "diffusion_pytorch_model.safetensors"), load_file(
        b.parent / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_sigkill_mid_step_then_resume_latest_matches_the_unbroken_run(reference_run, small_data, tiny_backbone_dir,
                                                                      tmp_path, capsys, caplog):
    out = tmp_path / "run"
    # micro-step 6 is step 3's second micro-batch: its gradient is half accumulated, checkpoint-2 is the latest
    killed = drive("--kill_at_micro_step", "6", "--", *flags(small_data, tiny_backbone_dir, out))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    caplog.set_level(logging.INFO, logger="accelerate.checkpointing")
    run_in_process(flags(small_data, tiny_backbone_dir, out, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert "All random states loaded successfully" in caplog.text  # accelerate says so, or that it could not
    assert_same_training_state(reference_run / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")
    ea = load_file(reference_run / "unet" / "diffusion_pytorch_model.safetensors")
    eb = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert json.loads((reference_run / "d3_config.json").read_text())["student_timestep"] == json.loads(
        (out / "d3_config.json").read_text())["student_timestep"]


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference_run, small_data, tiny_backbone_dir,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    # a checkpoint every update, each with an inference folder (the last update's never has one): killed in the 3rd
    killed = drive("--kill_in_checkpoint", "3", "--", *flags(small_data, tiny_backbone_dir, out),
                   "--checkpointing_steps", "1", "--export_every", "1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = out / ".checkpoint-3.tmp"
    assert (partial / "training_state" / "model.safetensors").exists() and (partial / "unet").is_dir()
    assert not (partial / "d3_config.json").exists() and not (out / "checkpoint-3").exists()
    with pytest.raises(CheckpointError):  # what the rename protects against: the partial folder is not a model
        D3Predictor.from_pretrained(partial, device="cpu")

    # latest is the previous, complete checkpoint; it loads for inference and for resuming
    assert resolve_resume(out, "latest") == out / "checkpoint-2"
    predictor = D3Predictor.from_pretrained(out / "checkpoint-2", device="cpu")
    depth = predictor.predict([np.full((16, 24, 3), 90, np.uint8)], processing_res=32)[0]
    assert depth.shape == (16, 24) and np.isfinite(depth).all()

    run_in_process(flags(small_data, tiny_backbone_dir, out, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert not list(out.glob(".checkpoint-*")), "the half-written folder is cleaned up"
    assert_same_training_state(reference_run / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}")


# -- non-finite losses ---------------------------------------------------------------------------------------------
def nan_at(micro_steps: set[int], seen: list):
    """The depth recipe with its task loss made NaN at the given micro-steps (1-based); records each batch's files."""

    def task_loss(pred, batch):
        seen.append(list(batch["path"]))
        terms = train_depth.RECIPE.task_loss(pred, batch)
        if len(seen) in micro_steps:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    return replace(train_depth.RECIPE, task_loss=task_loss)


def test_nonfinite_losses_skip_the_update_are_counted_and_stop_the_run(small_data, tiny_backbone_dir, tmp_path,
                                                                       caplog):
    out = tmp_path / "run"
    seen: list[list[str]] = []
    recipe = nan_at({2, 4, 5}, seen)
    args = build_parser(recipe).parse_args(flags(small_data, tiny_backbone_dir, out) + [
        "--gradient_accumulation_steps", "1", "--max_train_steps", "8", "--checkpointing_steps", "1",
        "--max_nonfinite", "2", "--checkpoints_total_limit", "0"])
    caplog.set_level(logging.WARNING, logger="d3.train")
    with pytest.raises(SystemExit) as info:
        train(args, recipe)
    # two in a row (steps 4 and 5) stop the run; the message names the step and the batch's files
    assert str(info.value) == (f"error: 2 non-finite losses in a row, last at step 5 on files: {', '.join(seen[4])}")
    assert len(seen) == 5
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == [f"non-finite loss at step {s} (files: {', '.join(seen[s - 1])}); update skipped"
                        for s in (2, 4, 5)]

    def weights(step):
        return load_file(out / f"checkpoint-{step}" / "training_state" / "model.safetensors")

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    w1, w2, w3, w4 = (weights(s) for s in (1, 2, 3, 4))
    assert same(w1, w2), "step 2 (NaN) changed the weights"
    assert not same(w2, w3), "step 3 (finite) must update"
    assert same(w3, w4), "step 4 (NaN) changed the weights"
    counters = json.loads((out / "checkpoint-4" / "training_state" / "trainer_state.json").read_text())
    assert counters["nonfinite"] == 2 and counters["nonfinite_in_row"] == 1 and counters["global_step"] == 4
    assert not (out / "checkpoint-5").exists()


# -- bad samples -----------------------------------------------------------------------------------------------------
@pytest.fixture
def data_with_bad_samples(tmp_path, small_data) -> tuple[Path, dict[str, str]]:
    """The 6 synthetic samples with 4 made unusable, one way each; returns {bad file: expected reason}."""
    import shutil

    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    rgb0 = root / "rgb" / "scene_00000.png"
    rgb0.write_bytes(rgb0.read_bytes()[:120])  # truncated image
    (root / "depth" / "scene_00001.npy").unlink()  # missing depth
    depth = np.load(root / "depth" / "scene_00002.npy")
    depth[3, 3] = np.nan
    np.save(root / "depth" / "scene_00002.npy", depth)  # NaN in the ground truth
    np.save(root / "depth" / "scene_00003.npy", np.zeros_like(depth))  # no valid pixel
    return root, {
        str(rgb0): "not a readable image",
        str(root / "depth" / "scene_00001.<missing>"): "missing depth file",
        str(root / "depth" / "scene_00002.npy"): "contains NaN or inf",
        str(root / "depth" / "scene_00003.npy"): "no valid pixel",
    }


def test_bad_samples_are_named_skipped_and_counted(data_with_bad_samples, tiny_backbone_dir, tmp_path, caplog):
    root, bad = data_with_bad_samples
    recipe = train_depth.RECIPE
    # one epoch (3 batches of 2) reads all 6 samples exactly once
    args = build_parser(recipe).parse_args(flags(root, tiny_backbone_dir, tmp_path / "run") + [
        "--gradient_accumulation_steps", "1", "--max_train_steps", "3", "--checkpointing_steps", "100"])
    caplog.set_level(logging.WARNING, logger="d3.train")
    result = train(args, recipe)
    messages = [r.getMessage() for r in caplog.records]
    skipped = sorted(m for m in messages if m.startswith("skipped bad sample: "))
    assert len(skipped) == 4, messages
    for path, reason in bad.items():
        assert any(m.startswith(f"skipped bad sample: {path}: ") and reason in m for m in skipped), (path, skipped)
    assert "4 bad samples were skipped (see the warnings above)" in messages
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "training_state" / "trainer_state.json").read_text())
    assert state["bad_samples"] == 4 and state["global_step"] == 3
    assert (result.output_dir / "d3_config.json").exists()


def test_on_bad_sample_error_stops_with_one_line_naming_the_file(data_with_bad_samples, tiny_backbone_dir, tmp_path):
    root, bad = data_with_bad_samples
    recipe = train_depth.RECIPE
    for workers in ("0", "1"):  # in a worker process the error crosses a process boundary: still one clean line
        args = build_parser(recipe).parse_args(flags(root, tiny_backbone_dir, tmp_path / f"run{workers}") + [
            "--gradient_accumulation_steps", "1", "--max_train_steps", "3", "--on_bad_sample", "error",
            "--dataloader_num_workers", workers])
        with pytest.raises(SystemExit) as info:
            train(args, recipe)
        message = str(info.value)
        assert "\n" not in message and message.startswith("error: bad training sample: "), message
        assert any(f"{path}: " in message and reason in message for path, reason in bad.items()), message


@pytest.mark.quick
def test_a_kill_between_the_two_renames_of_a_resave_loses_no_checkpoint(tmp_path):
    """Re-saving checkpoint-N sets the old one aside (.old), renames the new one in (.tmp -> final), then deletes the
    aside. Killed in between, the next start puts the old one back, or drops it once the new one is in place."""
    from d3.training_checkpoints import clean_interrupted_saves

    def folder(name: str, marker: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(marker)

    folder(".checkpoint-4.old", "old")  # killed after setting checkpoint-4 aside, before the new one was renamed in
    folder(".checkpoint-4.tmp", "new, maybe partial")
    folder("checkpoint-6", "six")
    folder(".checkpoint-6.old", "previous six")  # killed after the new checkpoint-6 landed, before the cleanup
    clean_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoint-4" / "marker").read_text() == "old"
    assert (tmp_path / "checkpoint-6" / "marker").read_text() == "six"
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-6"
