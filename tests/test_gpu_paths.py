"""Code paths that only run on a GPU, checked on the CPU with a fake `torch.cuda`:

- inference on cuda:K (torchrun, one GPU per process, or --device cuda:1) waits for its device-to-host copies on
  the stream of the model's GPU, not on cuda:0's, and infer.py / evaluate.py make cuda:K the current device first;
- a model moved to a device in another precision never exists there in fp32 (cast and move in one step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from d3.devices import cast_module, use_device
from d3.prefetch import _InFlight, _launch, _Prepared


class FakeStream:
    def __init__(self, device):
        self.device = device


class FakeEvent:
    made: list[FakeEvent] = []

    def __init__(self, *args, **kwargs):
        self.stream = "never recorded"
        self.waited = False
        FakeEvent.made.append(self)

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):
        self.waited = True


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a process with two GPUs and cuda:0 current sees it; tensors stay on the CPU."""
    current = {"device": torch.device("cuda:0")}
    set_calls = []

    def current_stream(device=None):
        return FakeStream(torch.device(device) if device is not None else current["device"])

    def set_device(device):
        set_calls.append(torch.device(device))
        current["device"] = torch.device(device)

    FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return set_calls


@pytest.mark.quick
def test_copies_back_from_cuda_k_are_awaited_on_cuda_k_stream(monkeypatch, fake_cuda):
    # A CPU build cannot pin memory or hold CUDA tensors: pinned buffers are plain ones and ".to(cuda:K)" stays put.
    real_empty, real_to = torch.empty, torch.Tensor.to
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (
        self if a and isinstance(a[0], torch.device) and a[0].type == "cuda" else real_to(self, *a, **k)))

    class Predictor:
        device = torch.device("cuda:1")

        def predict_tensor(self, batch):
            return batch * 2

        def postprocess_tensor(self, decoded, undo):
            return decoded + 1

    members = [_Prepared(path=None, key=i, image=None, x=torch.full((3, 4, 4), float(i)), undo=()) for i in range(2)]
    flight = _launch(Predictor(), members, pad_to=2)
    assert isinstance(flight, _InFlight) and len(FakeEvent.made) == 1
    event = FakeEvent.made[0]
    assert isinstance(event.stream, FakeStream), "the event must be recorded on a stream named explicitly"
    assert event.stream.device == torch.device("cuda:1")  # the model's GPU, not the current device (cuda:0)
    arrays = flight.arrays()
    assert event.waited
    np.testing.assert_array_equal(arrays[1], np.full((3, 4, 4), 3.0, np.float32))


@pytest.mark.quick
def test_use_device_makes_an_indexed_cuda_device_current(fake_cuda):
    use_device("cuda:1")
    use_device(torch.device("cuda:1"))
    for device in ("cuda", "cpu", None, "auto", torch.device("cpu")):
        use_device(device)
    assert fake_cuda == [torch.device("cuda:1")] * 2


class LoadStopped(Exception):
    pass


def test_infer_makes_cuda_k_current_before_the_model_loads(tmp_path, monkeypatch, fake_cuda):
    import infer
    from d3 import loading
    from d3.flags import CheckpointError

    seen = []

    def load_predictor(checkpoint, device=None, **kwargs):
        seen.append((device, list(fake_cuda)))
        raise CheckpointError("stop here")

    monkeypatch.setattr(loading, "load_predictor", load_predictor)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "ckpt").mkdir()
    status = infer.main(["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out"),
                         "--checkpoint", str(tmp_path / "ckpt"), "--device", "cuda:1"])
    assert status == 2
    assert seen == [("cuda:1", [torch.device("cuda:1")])]


def test_evaluation_makes_cuda_k_current_before_the_model_loads(tmp_path, monkeypatch, fake_cuda):
    from d3 import evaluation
    from d3.eval_options import EvalOptions

    seen = []

    def load_predictor(checkpoint, device, *args, **kwargs):
        seen.append((device, list(fake_cuda)))
        raise LoadStopped

    monkeypatch.setattr(evaluation, "load_predictor", load_predictor)
    with pytest.raises(LoadStopped):
        evaluation.run("nyu", tmp_path, EvalOptions(checkpoint="ckpt", device="cuda:1", output=tmp_path / "o"))
    assert seen == [(torch.device("cuda:1"), [torch.device("cuda:1")])]


class FloatOnDevice(TorchFunctionMode):
    """Records every tensor made on `device` by any torch call, with its dtype."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.dtypes = torch.device(device), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                self.dtypes.append(t.dtype)
        return out


@pytest.mark.quick
@pytest.mark.parametrize("diffusers_model", [False, True])
def test_cast_module_never_holds_fp32_weights_on_the_target_device(diffusers_model):
    # "meta" stands in for the GPU: what a cast-after-move would put there transiently is recorded all the same.
    if diffusers_model:
        from diffusers import AutoencoderKL

        module = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, layers_per_block=1)
    else:
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with FloatOnDevice("meta") as seen:
        moved = cast_module(module, torch.device("meta"), torch.bfloat16)
    assert {p.dtype for p in moved.parameters()} == {torch.bfloat16}
    assert {p.device for p in moved.parameters()} == {torch.device("meta")}
    assert seen.dtypes and torch.float32 not in seen.dtypes



@pytest.mark.quick
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_teacher_is_made_in_its_precision_without_a_second_fp32_copy(tiny_backbone_dir, monkeypatch, dtype):
    """Full fine-tuning: the student is the loaded fp32 model, the frozen teacher an independent copy in the step's
    precision. The copy is made tensor by tensor in bf16, never as a deepcopy of the fp32 model (FLUX.1-dev: 48 GB
    more host memory per process at start-up): no fp32 parameter is deep-copied while the two are built."""
    from types import SimpleNamespace

    from d3.backbone import load_backbone
    from d3.training_setup import build_student_and_teacher

    backbone = load_backbone(tiny_backbone_dir, with_text_encoder=False)
    originals = {name: p.detach().clone() for name, p in backbone.unet.named_parameters()}
    copied = []
    real_deepcopy = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__",
                        lambda self, memo: copied.append(self.dtype) or real_deepcopy(self, memo))
    student, teacher = build_student_and_teacher(SimpleNamespace(lora_rank=0), backbone, torch.device("cpu"), dtype)
    assert torch.float32 not in copied
    assert {p.dtype for p in student.model.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.model.parameters()} == {dtype}
    assert all(p.requires_grad for p in student.model.parameters())
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    for name, p in teacher.model.named_parameters():
        assert torch.equal(p, originals[name].to(dtype)), name
    for name, p in student.model.named_parameters():
        assert torch.equal(p, originals[name]), name
    with torch.no_grad():  # independent (fp32 too, where no cast is needed): training the student leaves the teacher
        for p in student.model.parameters():
            p.add_(1.0)
    for name, p in teacher.model.named_parameters():
        assert torch.equal(p, originals[name].to(dtype)), name
