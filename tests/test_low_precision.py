"""bf16 / fp16: what a GPU user gets from inference and from `--mixed_precision`, checked against fp32.

These run where the precision is used: on a CUDA GPU when there is one, and are skipped otherwise (CI has none).
`D3_TEST_DEVICE=cpu python -m pytest tests/test_low_precision.py` runs the bf16 checks on the CPU, which has bf16
kernels and autocast (fp16 checks and the FSDP run still need CUDA).

Tolerances follow the formats: bf16 rounds each operation to 2^-9 ≈ 2e-3 relative, fp16 to 2^-12 ≈ 2.4e-4, and the
tiny random-weight network accumulates a lot of that: measured on the CPU in bf16, encoder, UNet and decoder each
differ from fp32 by 1.3 %, 2.4 % and 1.7 % (given identical inputs), 7.8 % end to end, while the depth map differs by
0.003 on average (correlation 0.998). The bounds sit about twice above that (fp16 scaled by its 8x finer rounding):
far below what a real mistake gives (a wrongly cast timestep or prompt, an overflow, a lost scaling factor: O(1)).
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

import train_depth
from d3.predictor import D3Predictor
from d3.training import build_parser, train
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("D3_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs a CUDA GPU (or D3_TEST_DEVICE=cpu for the bf16 checks)")
REL_TOL = {"bf16": 0.15, "fp16": 0.04}  # decoded output, end to end
LOSS_TOL = {"bf16": 1e-2, "fp16": 5e-3}  # first-step losses, relative (bf16 on the CPU: 1.1e-3 at most)


def needs_cuda(precision: str) -> None:
    if precision == "fp16" and not DEVICE.startswith("cuda"):
        pytest.skip("fp16 kernels and loss scaling are a GPU matter")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_inference_agrees_with_fp32(tiny_depth_checkpoint, precision):
    needs_cuda(precision)
    reference = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu", dtype="fp32")
    low = D3Predictor.from_pretrained(tiny_depth_checkpoint, device=DEVICE, dtype=precision)
    assert next(low.unet.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    rgb = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = reference.predict_tensor(rgb)
    got = low.predict_tensor(rgb).cpu()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, want) < REL_TOL[precision], rel_err(got, want)
    # and the user-facing output: the same depth map up to the format's rounding, at the input's size
    image = (np.random.default_rng(1).random((40, 72, 3)) * 255).astype(np.uint8)
    depth_low, depth_ref = low.predict([image])[0], reference.predict([image])[0]
    assert depth_low.shape == (40, 72) and np.isfinite(depth_low).all()
    assert np.abs(depth_low - depth_ref).mean() < 0.02
    assert np.corrcoef(depth_low.ravel(), depth_ref.ravel())[0, 1] > 0.98


def run_training(backbone: Path, data: Path, out: Path, precision: str, steps: int, monkeypatch) -> tuple[list[dict], Path]:
    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
        "--lr_warmup_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none",
        "--dataloader_num_workers", "0", "--mixed_precision", precision, "--seed", "0"])
    if DEVICE == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the Accelerator would otherwise take a GPU if there is one
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state, fixed by the first Accelerator: each run here is a new "process"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(args, train_depth.RECIPE)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return result.history, result.output_dir


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_tracks_fp32_and_keeps_fp32_master_weights(tiny_backbone_dir, synthetic_train_dir,
                                                                            tmp_path, precision, monkeypatch):
    needs_cuda(precision)
    low, low_dir = run_training(tiny_backbone_dir, synthetic_train_dir, tmp_path / precision, precision, 3,
                                 monkeypatch)
    full, _ = run_training(tiny_backbone_dir, synthetic_train_dir, tmp_path / "fp32", "no", 1, monkeypatch)
    # step 1 starts from the same weights, batch, timesteps and noise: only the arithmetic differs
    for key in ("loss", "loss/align", "loss/mse", "loss/ssi"):
        assert abs(low[0][key] - full[0][key]) <= LOSS_TOL[precision] * abs(full[0][key]) + 1e-4, (key, low[0], full[0])
    assert all(np.isfinite(row["loss"]) for row in low)
    from safetensors.torch import load_file

    student = load_file(low_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in student.values()} == {torch.float32}, "the student is exported from fp32 master weights"
    base = load_file(tiny_backbone_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(student[k], base[k]) for k in base), "the student trained"
    predictor = D3Predictor.from_pretrained(low_dir, device=DEVICE)
    assert np.isfinite(predictor.predict([np.full((32, 48, 3), 100, np.uint8)])[0]).all()


def test_fsdp_config_trains_and_exports_on_one_gpu(tmp_path):
    """configs/fsdp_flux.yaml as shipped, only narrowed to one process: wrapping, sharded checkpoints, the gathered
    export. (accelerate's FSDP plugin refuses to start without a GPU.)"""
    if not DEVICE.startswith("cuda"):
        pytest.skip("accelerate's FSDP needs a GPU")
    from d3.data.synthetic import write_synthetic_dataset
    from d3.tiny import build_tiny_backbone

    backbone = build_tiny_backbone(tmp_path / "flux", preset="tiny-flux")
    data = write_synthetic_dataset(tmp_path / "data", 8, 32, 32, seed=0, tasks=("depth",))
    config = (ROOT / "configs" / "fsdp_flux.yaml").read_text().replace("num_processes: 8", "num_processes: 1")
    (tmp_path / "fsdp.yaml").write_text(config)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
                           str(ROOT / "train_depth.py"), "--pretrained_model_name_or_path", str(backbone), "--dataset",
                           str(data), "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2",
                           "--max_train_steps", "2", "--checkpointing_steps", "1", "--export_every", "1", "--lr_warmup_steps", "0",
                           "--dataloader_num_workers", "0", "--report_to", "none", "--gradient_checkpointing"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "checkpoint-2" / "training_state" / "trainer_state.json").read_text())["global_step"] == 2
    for folder in (out / "checkpoint-1", out):
        predictor = D3Predictor.from_pretrained(folder, device=DEVICE)
        assert predictor.config.architecture == "flux"
        assert np.isfinite(predictor.predict([np.full((32, 32, 3), 90, np.uint8)])[0]).all()
