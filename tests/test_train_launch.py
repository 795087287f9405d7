"""`accelerate launch train_depth.py` end to end: checkpoint, resume from `latest` continuing the step count, and
an exported folder that infer.py loads with no text encoder present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_depth.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # threads: OMP_NUM_THREADS as tests/conftest.py sets it
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_launch_checkpoint_resume_and_infer(tiny_backbone_dir, synthetic_train_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
              "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--lr_warmup_steps", "1",
              "--dataloader_num_workers", "0"]
    first = launch(*common, "--max_train_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["micro_step"] == 4  # two updates of two micro-batches
    assert list((out / "logs").rglob("events.out.tfevents*")), "tensorboard logs are written"

    second = launch(*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr and "at step 2" in second.stdout + second.stderr
    state = json.loads((out / "checkpoint-4" / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["micro_step"] == 8

    config = json.loads((out / "d3_config.json").read_text())
    assert config["task"] == "depth" and config["processing_res"] == 32
    assert not (out / "text_encoder").exists() and (out / "prompt_embeds.safetensors").exists()
    from PIL import Image
    import numpy as np

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((30, 50, 3), 128, np.uint8)).save(images / "x.png")
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--input", str(images), "--checkpoint", str(out),
                           "--output", str(tmp_path / "pred")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "pred" / "x_depth.npy").shape == (30, 50)
