"""What only shows with several processes, on CPU processes over gloo: FSDP sharding the learned timestep, gradient
accumulation under FSDP, a process whose whole micro-batch is unreadable, the process group's timeout; and the graph
of a skipped non-finite step, freed before the next forward.

The FSDP runs use raw `FullyShardedDataParallel` (accelerate's FSDP plugin needs CUDA) with configs/fsdp_flux.yaml's
settings, through the project's own Accelerator, step, logging and export (tests/fsdp_step_driver.py). "Equal" between
a run of 2 processes and one of 1 process means what tests/test_multiprocess_train.py means by it: the trained state
within a relative 1e-6, and the runs' difference within 1e-3 of how far training moved the weights (`--adam_epsilon
1e-3` keeps Adam from turning the different summation order of an all-reduce into full-size updates), logged losses
within a relative 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_depth
from d3.backbone import encode_condition, load_backbone
from d3.heads import ProjectionHeads
from d3.objective import D3Model
from d3.predictor import D3Predictor
from d3.training import build_parser, train
from d3.training_data import build_training_data
from d3.training_setup import accumulation_settings, launched_with_fsdp, make_accelerator
from tests.helpers import rel_err
from tests.test_multiprocess_train import REL_TOL, STATE_TOL, UPDATE_TOL, trained_state

ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("loss", "loss/align", "loss/mse", "loss/ssi", "loss/grad")
HANG = 600  # seconds: a run of 2 processes that has not finished by then is stuck in a collective

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from d3.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-flux") / "backbone", preset="tiny-flux")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from d3.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("dist") / "train", 8, 32, 32, seed=3, tasks=("depth",),
                                   invalid_fraction=0.0)


def flags(backbone: Path, data: Path, out: Path, batch: int, accumulation: int, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-4", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "7",
            "--adam_epsilon", "1e-3", "--log_history", str(out / "history.json"), *extra]


def run_two_processes(script: Path, args: list[str], port: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; a run still going after HANG seconds is killed (with its workers) and fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"2 processes still running after {HANG} s (a collective that one process never joined?)\n"
                    f"{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def flat(state: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(keys)])


# ------------------------------------------------------------------------------------------------ the timestep's shape
@pytest.mark.parametrize("preset", ["unet", "flux"])
def test_every_trainable_parameter_has_a_dimension_and_old_scalar_timesteps_still_load(preset, request,
                                                                                     tiny_backbone_dir):
    """FSDP1 refuses 0-dim parameters; the timestep is (1,) and predicts exactly as the scalar timestep did."""
    backbone = load_backbone(tiny_backbone_dir if preset == "unet" else request.getfixturevalue("tiny_flux_dir"))
    student = backbone.denoiser()
    layers = student.layer_set()
    model = D3Model(student, ProjectionHeads(student.feature_channels(layers)), layers, 300.0)
    scalars = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 0]
    assert scalars == [] and model.student_timestep.shape == (1,)

    z = torch.randn(1, student.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = encode_condition(backbone, "a depth map")
    embeds = embeds["encoder_hidden_states"] if preset == "unet" else embeds
    with torch.no_grad():
        expected = student(z, torch.tensor(300.0), embeds)  # the scalar timestep the model held before
        assert torch.equal(model.predict(z, embeds), expected)
        state = model.state_dict()
        state["student_timestep"] = torch.tensor(250.0)  # a checkpoint written while the timestep was 0-dim
        model.load_state_dict(state)
    assert model.student_timestep.shape == (1,) and model.student_timestep.item() == 250.0


# ---------------------------------------------------------------------------------------------------------- FSDP
def test_fsdp_step_with_accumulation_logs_and_exports_like_one_process(tiny_flux_dir, scenes, tmp_path):
    """Two FSDP processes (FULL_SHARD, use_orig_params, one unit per Flux block), 1 image each, 2 micro-batches per
    update, against one process with 2 images per micro-batch. The timestep is sharded: outside forward, process 1's
    view of it is empty (reading it there raised 'a Tensor with 0 elements cannot be converted to Scalar'), yet both
    log it. Under FSDP the micro-batch before the update reduces its gradients to shards (accelerate's
    `sync_each_batch`) instead of keeping the full gradients on every process (`no_sync`)."""
    out = tmp_path / "fsdp"
    out.mkdir()
    proc = run_two_processes(ROOT / "tests" / "fsdp_step_driver.py",
                             [str(out), "--", *flags(tiny_flux_dir, scenes, out, 1, 2, 1, "--ddp_timeout", "321")],
                             port=29681, env={"ACCELERATE_USE_FSDP": "true"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local_timestep_numel"] for r in ranks] == [1, 0], proc.stderr[-2000:]
    assert ranks[0]["logs"] == ranks[1]["logs"] and ranks[0]["logs"]["student_timestep"] == 420.0
    assert all(r["process_group_timeout"] == 321.0 for r in ranks)  # --ddp_timeout reached the gloo group

    init, full = load_file(out / "init.safetensors"), load_file(out / "full_state.safetensors")
    total = sum(v.numel() for v in init.values())
    assert all(r["sync_each_batch"] for r in ranks)
    first = [r["grad_numel"][0] for r in ranks]  # after the first micro-batch's backward
    assert all(n < 0.6 * total for n in first) and sum(first) > 0.99 * total, (first, total)

    reference = tmp_path / "one"
    result = train(build_parser(train_depth.RECIPE).parse_args(flags(tiny_flux_dir, scenes, reference, 2, 2, 1)),
                   train_depth.RECIPE)
    for key in LOSS_KEYS:
        assert rel_err(torch.tensor(ranks[0]["logs"][key]), torch.tensor(result.history[0][key])) <= REL_TOL, key
    ref = trained_state(reference, step=1)
    assert set(full) == set(ref) and full["student_timestep"].shape == (1,)
    moved = (flat(ref, ref) - flat(init, ref)).norm()
    assert moved > 0 and (flat(full, ref) - flat(ref, ref)).norm() <= UPDATE_TOL * moved
    assert rel_err(flat(full, ref), flat(ref, ref)) <= STATE_TOL

    # the export: written by rank 0 from the gathered state, with the learned (moved) timestep
    config = json.loads((out / "export" / "d3_config.json").read_text())
    assert config["student_timestep"] == float(full["student_timestep"]) != 420.0
    exported = load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    student = {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
    assert exported.keys() == student.keys() and all(torch.equal(exported[k], student[k]) for k in student)
    predictor = D3Predictor.from_pretrained(out / "export", device="cpu")
    assert predictor.config.student_timestep == config["student_timestep"]


@pytest.mark.quick
def test_fsdp_launches_accumulate_with_a_gradient_reduction_per_micro_batch(tmp_path, monkeypatch):
    assert launched_with_fsdp({"ACCELERATE_USE_FSDP": "true"}) and launched_with_fsdp({"ACCELERATE_USE_FSDP": "True"})
    assert not launched_with_fsdp({}) and not launched_with_fsdp({"ACCELERATE_USE_FSDP": "false"})
    args = build_parser(train_depth.RECIPE).parse_args(["--gradient_accumulation_steps", "4"])
    assert accumulation_settings(args, fsdp=False) == {"gradient_accumulation_steps": 4}
    plugin = accumulation_settings(args, fsdp=True)["gradient_accumulation_plugin"]
    assert plugin.num_steps == 4 and plugin.sync_each_batch
    for fsdp in (True, False):
        if fsdp:
            monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        else:
            monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        accelerator = make_accelerator(args, tmp_path)
        assert accelerator.gradient_accumulation_steps == 4
        assert accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False) is fsdp


@pytest.mark.quick
def test_ddp_timeout_flag_defaults_to_two_hours():
    parser = build_parser(train_depth.RECIPE)
    assert parser.parse_args([]).ddp_timeout == 7200
    text = " ".join(parser.format_help().split())
    assert "--ddp_timeout SECONDS" in text and "(default: 7200)" in text


# ------------------------------------------------------------------------------------------- unreadable micro-batch
def test_a_process_whose_whole_micro_batch_is_unreadable_keeps_in_step(tiny_backbone_dir, scenes, tmp_path):
    """2 processes of 1 image; at micro-step 2 process 1's only sample is unreadable. The run finishes, counts the
    sample (in every process's counter, so in the checkpoint and the logs rank 0 writes), and ends where one process
    with 2 images per micro-batch ends when it drops that sample from its batch: the remaining image, on the same
    noise, is the whole update."""
    data = Path(shutil.copytree(scenes, tmp_path / "data"))
    two, one = tmp_path / "two", tmp_path / "one"
    args = flags(tiny_backbone_dir, data, two, 1, 1, 4)
    parsed = build_parser(train_depth.RECIPE).parse_args(args)
    _, _, dataset, sampler = build_training_data(parsed, train_depth.RECIPE, num_processes=2, process_index=1)
    sampler.set_epoch(0)
    (index,) = list(sampler)[1]  # process 1's sample in micro-step 2
    rgb = Path(dataset[index]["path"])
    rgb.write_bytes(rgb.read_bytes()[:120])  # truncated: unreadable

    proc = run_two_processes(ROOT / "train_depth.py", args + ["--ddp_timeout", "300"], port=29682)
    assert f"skipped bad sample: {rgb}" in proc.stderr
    assert "1 bad samples were skipped" in proc.stderr  # said by rank 0, whose own samples were all readable
    train(build_parser(train_depth.RECIPE).parse_args(flags(tiny_backbone_dir, data, one, 2, 1, 4)), train_depth.RECIPE)

    for run in (two, one):
        state = json.loads((run / "checkpoint-4" / "training_state" / "trainer_state.json").read_text())
        assert state["bad_samples"] == 1 and state["global_step"] == 4
    h2, h1 = (json.loads((run / "history.json").read_text()) for run in (two, one))
    assert [h["bad_samples"] for h in h2] == [h["bad_samples"] for h in h1] == [0, 1, 1, 1]
    for a, b in zip(h2, h1):
        for key in LOSS_KEYS:
            assert abs(a[key] - b[key]) <= REL_TOL * abs(b[key]), (a["step"], key, a[key], b[key])
    ours, reference = trained_state(two), trained_state(one)
    assert set(ours) == set(reference)
    halfway = flat(trained_state(one, step=2), reference)
    moved = (flat(reference, reference) - halfway).norm()
    assert moved > 0 and (flat(ours, reference) - flat(reference, reference)).norm() <= UPDATE_TOL * moved
    assert rel_err(flat(ours, reference), flat(reference, reference)) <= STATE_TOL


# --------------------------------------------------------------------------------------------- a skipped step's graph
def test_a_skipped_nonfinite_step_frees_its_graph_before_the_next_forward(tiny_backbone_dir, scenes, tmp_path,
                                                                        monkeypatch):
    """Every tensor the step saves for backward is wrapped in a holder only the autograd graph references; when the
    next step starts, no holder of the skipped (non-finite) step may be alive."""
    import d3.training as training

    real_step = training.d3_step
    holders: list[list[weakref.ref]] = []  # per call: the holders of its saved tensors
    alive_at_start: list[int] = []  # per call: the previous call's holders still alive when it starts

    class Saved:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    def step(*args, **kwargs):
        alive_at_start.append(sum(ref() is not None for ref in holders[-1]) if holders else 0)
        refs: list[weakref.ref] = []

        def pack(tensor):
            # detached: a holder of a tensor that is its own node's output would otherwise close a cycle (holder ->
            # tensor -> node -> holder) through C++, which not even the garbage collector frees
            saved = Saved(tensor.detach())
            refs.append(weakref.ref(saved))
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
            out = real_step(*args, **kwargs)
        holders.append(refs)
        if len(holders) == 1:  # the first step's loss is NaN: its update is skipped
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(training, "d3_step", step)
    result = train(build_parser(train_depth.RECIPE).parse_args(flags(tiny_backbone_dir, scenes, tmp_path / "run", 2,
                                                                     1, 2)), train_depth.RECIPE)
    assert result.history[0]["nonfinite"] == 1 and len(holders) == 2
    assert len(holders[0]) > 100  # the step saved its activations for backward
    assert alive_at_start[1] == 0, f"{alive_at_start[1]} of {len(holders[0])} saved tensors of the skipped step alive"
