"""The speed and memory options keep what they promise.

- Gradient checkpointing and channels_last leave the D³ step's mathematics alone: with them on, the efficient step
  still equals the official-style step (every loss and gradient to 1e-5 relative in float64), and checkpointing
  really keeps fewer activations.
- --compile wires torch.compile onto the student, the teacher and the VAE (training) and the UNet and VAE
  (inference). Running inductor on this CPU takes many minutes, so the run is checked with dynamo's "eager" backend
  (graph capture, hooks included, without code generation); the inductor path is what benchmarks/ exercise on a GPU.
- The inference pipeline (d3/prefetch.py) overlaps reading, the model and writing, batches by input size, pads a
  compiled model's last batch, and reports every per-file failure without stopping the rest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_depth
from d3.timesteps import stratified_timesteps
from d3.prefetch import BackgroundWriter, ordered_prefetch, predict_files
from d3.objective import Objective, d3_step
from d3.training import build_parser
from d3.training_setup import adamw, apply_speed_flags
from d3.reference_step import build_parts, per_copy_step
from tests.helpers import grads, rel_err
from tests.test_equivalence import cast_batch, depth_batch

REL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _step(step_fn, parts, batch, timesteps, noise):
    parts.model.zero_grad(set_to_none=True)
    out = step_fn(parts.model, parts.experts(), parts.vae, parts.prompt_embeds,
                  Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS), batch, timesteps, noise)
    out.loss.backward()
    return out, grads(parts.model)


def _float64_parts(backbone):
    torch.manual_seed(0)
    parts = build_parts(backbone)
    for module in (parts.model, parts.teacher, parts.vae):
        module.to(torch.float64)
    parts.prompt_embeds = parts.prompt_embeds.to(torch.float64)
    batch = cast_batch(depth_batch(2, 32), torch.float64)
    g = torch.Generator().manual_seed(0)
    timesteps = stratified_timesteps(2, 3, generator=g)
    noise = torch.randn(2, 3, 4, 8, 8, generator=g).to(torch.float64)
    return parts, batch, timesteps, noise


@pytest.mark.parametrize("flags", [{"gradient_checkpointing": True},
                                   {"gradient_checkpointing": True, "channels_last": True}])
def test_flags_keep_the_efficient_step_equal_to_the_official_step(tiny_backbone_dir, flags):
    parts, batch, timesteps, noise = _float64_parts(tiny_backbone_dir)
    ref, ref_grads = _step(per_copy_step, parts, batch, timesteps, noise)  # plain model: the oracle
    apply_speed_flags(parts.model, parts.teacher, parts.vae, **flags)
    if flags.get("gradient_checkpointing"):
        assert parts.model.student.is_gradient_checkpointing and parts.vae.is_gradient_checkpointing
    if flags.get("channels_last"):
        conv = parts.model.student.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fast, fast_grads = _step(d3_step, parts, batch, timesteps, noise)
    assert rel_err(fast.loss, ref.loss) <= REL_TOL
    assert rel_err(fast.align, ref.align) <= REL_TOL
    for term in ref.task_terms:
        assert rel_err(fast.task_terms[term], ref.task_terms[term]) <= REL_TOL, term
    assert set(fast_grads) == set(ref_grads) and "student_timestep" in fast_grads
    for name, grad in ref_grads.items():
        assert rel_err(fast_grads[name], grad) <= REL_TOL or float(grad.norm()) < 1e-12, name
    # A second step after the backward's recomputation: the features captured then do not leak into this one.
    again, again_grads = _step(d3_step, parts, batch, timesteps, noise)
    assert rel_err(again.loss, ref.loss) <= REL_TOL
    assert all(rel_err(again_grads[n], g) <= REL_TOL or float(g.norm()) < 1e-12 for n, g in ref_grads.items())


def _saved_activation_bytes(parts, batch, timesteps, noise) -> int:
    """Bytes autograd keeps for the backward pass of one step (what checkpointing is meant to cut)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    parts.model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = d3_step(parts.model, parts.experts(), parts.vae, parts.prompt_embeds,
                      Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS), batch, timesteps, noise)
    out.loss.backward()
    return total


def test_gradient_checkpointing_keeps_fewer_activations(tiny_backbone_dir):
    parts, batch, timesteps, noise = _float64_parts(tiny_backbone_dir)
    plain = _saved_activation_bytes(parts, batch, timesteps, noise)
    apply_speed_flags(parts.model, parts.teacher, parts.vae, gradient_checkpointing=True)
    checkpointed = _saved_activation_bytes(parts, batch, timesteps, noise)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_flag_compiles_student_teacher_and_vae(tiny_backbone_dir):
    args = build_parser(train_depth.RECIPE).parse_args(["--compile", "--gradient_checkpointing", "--channels_last",
                                                         "--allow_tf32", "--no_fused_adam"])
    assert args.compile and args.gradient_checkpointing and args.channels_last and args.allow_tf32
    parts = build_parts(tiny_backbone_dir)
    apply_speed_flags(parts.model, parts.teacher, parts.vae, compile=args.compile)
    assert all(_compiled(m) for m in (parts.model.student, parts.teacher, parts.vae.encoder, parts.vae.decoder))
    assert torch._dynamo.config.recompile_limit >= 64  # one graph per resolution bucket without falling back


@pytest.mark.quick
def test_fused_adamw_only_where_it_exists():
    params = [torch.nn.Parameter(torch.zeros(3))]
    ns = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.01,
                         adam_epsilon=1e-8, no_fused_adam=False)
    assert adamw(params, ns, torch.device("cpu")).defaults.get("fused")
    assert adamw(params, ns, torch.device("cuda")).defaults.get("fused")  # built lazily: no GPU needed to check
    assert not adamw(params, ns, torch.device("meta")).defaults.get("fused")  # no fused kernel there
    ns.no_fused_adam = True
    assert not adamw(params, ns, torch.device("cuda")).defaults.get("fused")
    assert not adamw(params, ns, torch.device("cpu")).defaults.get("fused")


def test_fused_cpu_adamw_takes_the_same_steps_as_the_foreach_one():
    """The CPU default changed from foreach to fused: the same updates up to float rounding, over several steps."""
    ns = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.01,
                            adam_epsilon=1e-8, no_fused_adam=False)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(257, generator=g), torch.randn(3, 5, generator=g)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    foreach = [torch.nn.Parameter(t.clone()) for t in start]
    opt_fused = adamw(fused, ns, torch.device("cpu"))
    ns.no_fused_adam = True
    opt_foreach = adamw(foreach, ns, torch.device("cpu"))
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for params, opt in ((fused, opt_fused), (foreach, opt_foreach)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b, s in zip(fused, foreach, start):
        assert not torch.equal(a, s)  # they moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_training_runs_with_the_memory_flags(tiny_backbone_dir, synthetic_train_dir, tmp_path):
    from d3.training import train

    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
        "--output_dir", str(tmp_path / "run"), "--resolution", "32", "--train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "100000", "--report_to", "none", "--dataloader_num_workers", "0",
        "--gradient_checkpointing", "--channels_last",
    ])
    result = train(args, train_depth.RECIPE)
    assert len(result.history) == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    assert (result.output_dir / "unet" / "config.json").exists()


# ------------------------------------------------------------------------------------------------------ inference
def test_predictor_channels_last_agrees_with_the_plain_model(tiny_depth_checkpoint):
    from d3.predictor import D3Predictor

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu").predict_tensor(x)
    fast = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu").speed_up(channels_last=True)
    assert rel_err(fast.predict_tensor(x), plain) <= 1e-4  # fp32 NHWC kernels round differently (~1e-5), no more


def test_compiled_predictor_agrees_with_the_plain_model(tiny_depth_checkpoint):
    """Dynamo captures the inference UNet and VAE and runs them (~40 s on a busy 2-core CPU with the eager
    backend; inductor's code generation would take many minutes here)."""
    from d3.predictor import D3Predictor

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu").predict_tensor(x)
    compiled = D3Predictor.from_pretrained(tiny_depth_checkpoint, device="cpu")
    compiled.speed_up(compile=True, compile_backend="eager")
    assert compiled.compiled and all(_compiled(m) for m in (compiled.unet, compiled.vae.encoder, compiled.vae.decoder))
    assert rel_err(compiled.predict_tensor(x), plain) <= 1e-4
    # New image sizes in the same bucket (a compiled model pads to the UNet's full multiple: 64x64 here), and a last
    # batch of one: no new graph.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # the UNet, the VAE encoder and decoder were captured
    sizes = {"a": (60, 64), "b": (64, 57), "c": (49, 50)}
    written = {}
    predict_files(compiled, [(Path(f"{n}.png"), n) for n in sizes],
                  lambda p: np.full((*sizes[p.stem], 3), 100, np.uint8),
                  lambda key, pred, image: written.__setitem__(key, pred.shape), lambda p, r: pytest.fail(r),
                  processing_res=0, batch_size=2, workers=2)
    assert written == sizes and counters["stats"]["unique_graphs"] == graphs


class FakePredictor:
    """Duck-types what predict_files needs; the model takes `model_s` per batch and records the batch sizes."""

    def __init__(self, model_s: float = 0.0, compiled: bool = False, fail_batches_over: int | None = None,
                 poisoned: float | None = None):
        self.config = SimpleNamespace(processing_res=0, resize_mode="keep_aspect")
        self.model_s, self.compiled = model_s, compiled
        self.fail_batches_over, self.poisoned = fail_batches_over, poisoned
        self.batches: list[int] = []

    def preprocess(self, image, res, mode):
        x = torch.from_numpy(image).permute(2, 0, 1).float()
        return x, tuple(image.shape[:2])

    def predict_tensor(self, x):
        self.batches.append(x.shape[0])
        if self.fail_batches_over is not None and x.shape[0] > self.fail_batches_over:
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.poisoned is not None and bool((x == self.poisoned).all(dim=(1, 2, 3)).any()):
            raise RuntimeError("non-finite activations (simulated)")
        time.sleep(self.model_s)
        return x.mean(1, keepdim=True)

    def postprocess_tensor(self, decoded, undo):
        return decoded[0]


def _image(value: int, h: int = 4, w: int = 4) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_pipeline_overlaps_reading_model_and_writing():
    """Reading, the model and writing take 40 ms each per image: in sequence 8 images would take ~1 s."""
    seen = {}

    def read(path):
        time.sleep(0.04)
        return _image(int(path.stem))

    def write(key, prediction, image):
        time.sleep(0.04)
        seen[key] = float(prediction.mean())

    jobs = [(Path(f"{i}.png"), i) for i in range(8)]
    start = time.perf_counter()
    predict_files(FakePredictor(model_s=0.04), jobs, read, write, lambda p, r: pytest.fail(f"{p}: {r}"),
                  batch_size=1, workers=4)
    elapsed = time.perf_counter() - start
    assert seen == {i: float(i) for i in range(8)}  # every image's own prediction reached its writer
    assert elapsed < 0.7, f"{elapsed:.2f} s: reading and writing are not overlapped with the model"


def test_on_the_cpu_the_pipeline_reads_and_writes_in_the_models_thread_by_default():
    """No reader/writer threads by default for a CPU predictor (they would compete with the model for its cores);
    threads for a GPU's, and whenever --workers asks for them."""
    from d3.flags import default_workers

    assert default_workers("cpu") == 0 and default_workers("cuda") >= 1 and default_workers() >= 1
    for workers, threaded in ((None, False), (1, True)):
        threads = set()

        def read(path):
            threads.add(threading.current_thread() is threading.main_thread())
            return _image(1)

        def write(key, prediction, image):
            threads.add(threading.current_thread() is threading.main_thread())

        predict_files(FakePredictor(), [(Path(f"{i}.png"), i) for i in range(3)], read, write,
                      lambda p, r: pytest.fail(r), batch_size=1, workers=workers)
        assert threads == ({False} if threaded else {True}), workers


@pytest.mark.quick
def test_pipeline_batches_by_size_and_pads_a_compiled_models_last_batch():
    sizes = {0: (4, 4), 1: (8, 4), 2: (4, 4), 3: (4, 4), 4: (8, 4)}
    written = {}
    fake = FakePredictor(compiled=True)
    predict_files(fake, [(Path(f"{i}.png"), i) for i in sizes], lambda p: _image(int(p.stem), *sizes[int(p.stem)]),
                  lambda key, pred, img: written.__setitem__(key, pred.shape), lambda p, r: pytest.fail(r),
                  batch_size=2, workers=2)
    assert written == {i: s for i, s in sizes.items()}
    assert fake.batches == [2, 2, 2]  # (0, 2), (1, 4), then 3 alone, padded to the compiled batch size


@pytest.mark.parametrize("workers", [2, 0])
def test_pipeline_reports_each_failing_file_and_finishes_the_others(workers):
    failures, written = [], []

    def read(path):
        if path.stem == "unreadable":
            from d3.io import ImageReadError

            raise ImageReadError(path, "not a readable image (truncated)")
        return _image(7 if path.stem == "poison" else 1)

    def write(key, prediction, image):
        if key == "readonly":
            raise PermissionError("read-only folder")
        written.append(key)

    names = ["a", "unreadable", "poison", "b", "readonly", "c"]
    fake = FakePredictor(fail_batches_over=2, poisoned=7.0)
    predict_files(fake, [(Path(f"{n}.png"), n) for n in names], read, write,
                  lambda p, reason: failures.append((p.stem, reason)), batch_size=4, workers=workers)
    assert sorted(written) == ["a", "b", "c"]
    reasons = dict(failures)
    assert set(reasons) == {"unreadable", "poison", "readonly"}
    assert reasons["unreadable"] == "not a readable image (truncated)"
    assert reasons["poison"].startswith("prediction failed (RuntimeError: non-finite")
    assert reasons["readonly"].startswith("cannot write outputs (read-only folder")
    assert 4 in fake.batches  # the batch of 4 was tried first, then its images one by one


@pytest.mark.quick
def test_ordered_prefetch_keeps_order_bounds_look_ahead_and_isolates_errors():
    running, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01 * (i % 3))
        with lock:
            running -= 1
        if i == 5:
            raise ValueError("bad item")
        return i * i

    out = list(ordered_prefetch(range(20), work, workers=8, ahead=3))
    assert [item for item, _, _ in out] == list(range(20))
    assert [r for i, r, e in out if i != 5] == [i * i for i in range(20) if i != 5]
    assert isinstance(out[5][2], ValueError) and out[5][1] is None
    assert peak <= 3


def test_background_writer_reports_io_errors_and_raises_bugs():
    done, errors = [], []

    def write(i):
        if i == 3:
            raise OSError("disk full")

    with BackgroundWriter(2, done.append, lambda k, e: errors.append(k), max_pending=2) as writer:
        for i in range(6):
            writer.submit(i, write, i)
    assert done == [0, 1, 2, 4, 5] and errors == [3]
    with pytest.raises(ZeroDivisionError):
        with BackgroundWriter(1, done.append, errors.append) as writer:
            writer.submit("x", lambda: 1 / 0)
