"""DeepSpeed ZeRO-2 (configs/deepspeed_zero2.yaml) for real, on DeepSpeed's CPU accelerator with 1 process.

`accelerate launch --config_file configs/deepspeed_zero2.yaml --num_processes 1 train_depth.py` trains, writes a
checkpoint, resumes from it, skips a non-finite update and exports; against a plain (no DeepSpeed) run of the same
flags it logs the same LR per update, the same losses, and ends with the same weights (to fp32 rounding of ZeRO's
flattened AdamW). Under `--mixed_precision bf16` the exported student and its learned timestep stay fp32 (DeepSpeed's
own bf16 mode would have cast them: 261 would have become 260). The N-process LR arithmetic is in
tests/test_lr_schedule.py (on the CPU accelerate reports 1 process per rank under DeepSpeed).

The first DeepSpeed launch on a machine JIT-builds DeepSpeed's shared-memory communication op (about 2 minutes
here, once; cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import rel_err

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
STEPS, HALF, WARMUP, LR = 4, 2, 3, 1e-3
NAN_AT = 3  # the update whose loss is made NaN (the resumed run's first micro-step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(backbone: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--learning_rate", str(LR),
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(WARMUP), "--mixed_precision", "bf16",
            "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "5"]


def launch_zero2(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "deepspeed_zero2.yaml"), "--num_processes", "1", "--main_process_port",
           str(free_port()), str(ROOT / "tests" / "nan_train_driver.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # threads: OMP_NUM_THREADS as tests/conftest.py sets it
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def plain_run(backbone: Path, data: Path, out: Path, monkeypatch) -> list[dict]:
    """The same flags without DeepSpeed, in this process, NaN at the same update."""
    from dataclasses import replace

    import train_depth
    from accelerate.state import AcceleratorState
    from d3.training import build_parser, train

    calls = {"n": 0}

    def task_loss(pred, batch):
        calls["n"] += 1
        terms = train_depth.RECIPE.task_loss(pred, batch)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == NAN_AT else terms

    recipe = replace(train_depth.RECIPE, task_loss=task_loss)
    args = build_parser(recipe).parse_args(flags(backbone, data, out, STEPS) + ["--log_history", str(out / "h.json")])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)  # a new "process" for accelerate's process-wide state
    try:
        return train(args, recipe).history
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_zero2_launch_trains_resumes_skips_nonfinite_and_exports_fp32(tiny_backbone_dir, tmp_path, monkeypatch):
    from d3.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", 8, 32, 32, seed=2, tasks=("depth",), invalid_fraction=0.0)
    out = tmp_path / "zero2"
    first = launch_zero2("--", *flags(tiny_backbone_dir, data, out, HALF), "--log_history", str(tmp_path / "h1.json"))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoint-2" / "training_state" / "pytorch_model").is_dir()  # DeepSpeed's engine checkpoint
    second = launch_zero2("--nan_at_micro_step", "1", "--", *flags(tiny_backbone_dir, data, out, STEPS),
                          "--resume_from_checkpoint", "latest", "--log_history", str(tmp_path / "h2.json"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in second.stdout + second.stderr
    assert "non-finite loss at step 3" in second.stderr
    state = json.loads((out / "checkpoint-4" / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and state["nonfinite"] == 1

    logged = {h["step"]: h for h in json.loads((tmp_path / "h1.json").read_text())
              + json.loads((tmp_path / "h2.json").read_text()) if h["step"] != NAN_AT}
    # constant_with_warmup counted in updates: LR·k/3 during the warm-up, then LR; the skipped update does not
    # advance the schedule, so update 4 is the schedule's third step
    assert sorted(logged) == [1, 2, 4]
    assert [logged[k]["lr"] for k in (1, 2, 4)] == pytest.approx([LR / 3, 2 * LR / 3, LR], rel=1e-6)

    reference = {h["step"]: h for h in plain_run(tiny_backbone_dir, data, tmp_path / "plain", monkeypatch)}
    for k in (1, 2, 4):
        assert logged[k]["lr"] == reference[k]["lr"]
        assert logged[k]["loss"] == pytest.approx(reference[k]["loss"], rel=1e-4)

    # the export: an fp32 student equal to the plain run's, and a timestep that moved by less than bf16 can hold
    student = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    plain = load_file(tmp_path / "plain" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_backbone_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in student.values()} == {torch.float32}
    flat = lambda s: torch.cat([s[k].flatten().double() for k in sorted(base)])  # noqa: E731
    moved = (flat(plain) - flat(base)).norm()
    assert moved > 0 and (flat(student) - flat(plain)).norm() <= 1e-3 * moved, rel_err(flat(student), flat(plain))
    timestep = json.loads((out / "d3_config.json").read_text())["student_timestep"]
    assert 259 < timestep < 261 and torch.tensor(timestep).bfloat16().float().item() != timestep
    plain_timestep = json.loads((tmp_path / "plain" / "d3_config.json").read_text())["student_timestep"]
    assert timestep == pytest.approx(plain_timestep, abs=1e-4)


# -- the DeepSpeed settings d3 makes before `prepare` (accelerate's real plugin; no engine needed) -------------------
def zero2_accelerator(precision: str = "bf16", accumulation: int = 1, stage: int = 2):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=accumulation, gradient_clipping=1.0)
    plugin.set_mixed_precision(precision)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=accumulation,
                           num_processes=8)


def train_args(**kw):
    return SimpleNamespace(**{"train_batch_size": 4, "gradient_accumulation_steps": 1, "max_grad_norm": 0.5, **kw})


@pytest.mark.quick
def test_deepspeed_config_gets_integers_and_keeps_the_model_fp32_under_bf16_autocast():
    from d3.training_setup import configure_deepspeed

    accelerator = zero2_accelerator()
    plugin = accelerator.state.deepspeed_plugin
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what made accelerate's prepare raise
    configure_deepspeed(accelerator, train_args(), torch.bfloat16)
    config = plugin.deepspeed_config
    assert not plugin.is_auto("train_micro_batch_size_per_gpu") and not plugin.is_auto("train_batch_size")
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 32)
    assert config["gradient_clipping"] == 0.5  # --max_grad_norm, as under DDP
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]  # no bf16 cast of the D3Model
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


@pytest.mark.quick
@pytest.mark.parametrize("change, flag", [
    (dict(accumulation=8), "--gradient_accumulation_steps 8"),
    (dict(precision="fp16"), "--mixed_precision fp16"),
    (dict(stage=3), "ZeRO-3"),
])
def test_deepspeed_settings_that_would_silently_go_wrong_are_refused(change, flag):
    from d3.training_setup import configure_deepspeed

    accelerator = zero2_accelerator(**change)
    dtype = torch.float16 if change.get("precision") == "fp16" else torch.bfloat16
    with pytest.raises(SystemExit) as info:
        configure_deepspeed(accelerator, train_args(gradient_accumulation_steps=change.get("accumulation", 1)), dtype)
    assert str(info.value).startswith("error: ") and flag in str(info.value)


def test_without_deepspeed_nothing_changes():
    from d3.training_setup import configure_deepspeed

    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), train_args(), torch.bfloat16)


@pytest.mark.quick
def test_on_cuda_the_engine_forward_keeps_the_bf16_autocast(monkeypatch):
    """DeepSpeed's engine forward turns an outer autocast off unless its config enables `torch_autocast`
    (`autocast_if_enabled`, DeepSpeed >= 0.17.2). It asks `torch.is_autocast_enabled()`, which reads CUDA's state
    only: on the CPU the outer autocast passes through either way, so the launch test above cannot see this. Here
    CUDA's outer autocast is simulated; the student must still run in bf16 inside the engine, as under DDP."""
    from deepspeed.runtime import torch_autocast as ds_autocast
    from deepspeed.runtime.config import DeepSpeedConfig

    from d3.training_setup import configure_deepspeed

    accelerator = zero2_accelerator()
    accelerator.num_processes = 1  # DeepSpeed's config check compares the batch with its (here: 1-process) world
    configure_deepspeed(accelerator, train_args(), torch.bfloat16)
    config = DeepSpeedConfig(accelerator.state.deepspeed_plugin.deepspeed_config)
    engine = SimpleNamespace(torch_autocast_enabled=lambda: config.torch_autocast_enabled,
                             torch_autocast_dtype=lambda: config.torch_autocast_dtype)
    assert config.torch_autocast_lower_precision_safe_modules == []  # gradients are reduced in fp32
    monkeypatch.setattr(ds_autocast, "_WARNED_NESTED_AUTOCAST", True)  # (its one-time log needs a process group)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # faked only inside the outer autocast: its exit then restores the real state (autocast off) for the tests
        # that follow in this process
        with monkeypatch.context() as inside:
            inside.setattr(torch, "is_autocast_enabled", lambda *args: True)  # as inside `step_autocast` on CUDA
            with ds_autocast.autocast_if_enabled(engine):
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
