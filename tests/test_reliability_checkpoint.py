"""Untrusted and malformed checkpoint files: one-line errors naming the file and the problem; nothing unpickled.

A d3 checkpoint loads only through safetensors (strictly: missing, unexpected and mis-shaped weights are errors that
list the keys); the authors' .pth only through torch.load(weights_only=True); a resume state only through
accelerate's weights-only loader.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import infer
from d3.checkpoint import CheckpointError
from d3.predictor import D3Predictor
from tests.helpers import PickleTrap

ROOT = Path(__file__).resolve().parents[1]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def ckpt(tmp_path, tiny_depth_checkpoint) -> Path:
    """A private copy of the tiny depth checkpoint to break."""
    return Path(shutil.copytree(tiny_depth_checkpoint, tmp_path / "ckpt"))


def load_error(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        D3Predictor.from_pretrained(path, device="cpu", **kw)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.quick
def test_the_intact_copy_loads_and_predicts(ckpt):
    predictor = D3Predictor.from_pretrained(ckpt, device="cpu")
    assert predictor.task == "depth"
    out = predictor.predict([np.full((20, 30, 3), 100, np.uint8)], processing_res=32)[0]
    assert out.shape == (20, 30) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda f: f.unlink(), "d3_config.json: missing"),
        (lambda f: f.write_text("{ task: depth"), "not valid JSON"),
        (lambda f: f.write_text("[1, 2]"), "expected a JSON object"),
        (lambda f: edit_json(f, lambda d: d.pop("task")), "no 'task'"),
        (lambda f: edit_json(f, lambda d: d.update(task="segmentation")), "task 'segmentation' is not one of"),
        (lambda f: edit_json(f, lambda d: d.update(colour="blue")), "unknown keys ['colour']"),
        (lambda f: edit_json(f, lambda d: d.update(processing_res="large")), "processing_res must be of type int, got 'large'"),
        (lambda f: edit_json(f, lambda d: d.update(student_timestep=None)), "student_timestep must be of type float, got None"),
        (lambda f: edit_json(f, lambda d: d.update(format_version=99)), "newer than this d3"),
    ],
    ids=["missing", "not-json", "not-object", "no-task", "unknown-task", "unknown-key", "wrong-type", "null",
         "future-version"],
)
def test_missing_or_malformed_d3_config(ckpt, breakage, expected):
    breakage(ckpt / "d3_config.json")
    message = load_error(ckpt)
    assert str(ckpt / "d3_config.json") in message and expected in message, message


@pytest.mark.quick
def test_missing_weights_and_parts_are_named(ckpt, tmp_path):
    broken = Path(shutil.copytree(ckpt, tmp_path / "no-unet-weights"))
    (broken / UNET_WEIGHTS).unlink()
    assert load_error(broken) == f"{broken / 'unet'}: no .safetensors weights for the UNet (other formats are not loaded)"

    broken = Path(shutil.copytree(ckpt, tmp_path / "no-vae-config"))
    (broken / "vae" / "config.json").unlink()
    assert str(broken / "vae" / "config.json") in load_error(broken)

    broken = Path(shutil.copytree(ckpt, tmp_path / "no-prompt"))
    (broken / "prompt_embeds.safetensors").unlink()
    assert f"{broken / 'prompt_embeds.safetensors'}: missing" in load_error(broken)

    broken = Path(shutil.copytree(ckpt, tmp_path / "truncated"))
    data = (broken / UNET_WEIGHTS).read_bytes()
    (broken / UNET_WEIGHTS).write_bytes(data[: len(data) // 2])
    message = load_error(broken)
    assert message.startswith(f"{broken / UNET_WEIGHTS}: cannot load the UNet"), message

    assert load_error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: no such checkpoint folder"


def test_a_task_other_than_the_one_asked_for(ckpt, tmp_path, capsys):
    message = load_error(ckpt, task="normal")
    assert message == f"{ckpt / 'd3_config.json'}: this checkpoint predicts 'depth', not 'normal'"
    # the same through infer.py: a one-line usage error, exit status 2, nothing written
    images = tmp_path / "images"
    images.mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    code = infer.main(["--input", str(images), "--checkpoint", str(ckpt), "--task", "normal",
                       "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config_are_listed(ckpt, tmp_path):
    # a UNet config edited to other channel counts: every mis-shaped tensor is an error, the first ones named
    broken = Path(shutil.copytree(ckpt, tmp_path / "channels"))
    edit_json(broken / "unet" / "config.json",
              lambda c: c.update(block_out_channels=[2 * n for n in c["block_out_channels"]]))
    message = load_error(broken)
    assert message.startswith(f"{broken / UNET_WEIGHTS}: UNet weights do not match {broken / 'unet' / 'config.json'}")
    assert "size mismatch for conv_in.weight" in message and "more)" in message, message

    broken = Path(shutil.copytree(ckpt, tmp_path / "in-channels"))
    edit_json(broken / "unet" / "config.json", lambda c: c.update(in_channels=8))
    message = load_error(broken)
    assert message.endswith("size mismatch for conv_in.weight (first: [32, 4, 3, 3] in the weights, [32, 8, 3, 3] "
                            "in the config)"), message

    # strict loading: a missing tensor is not silently initialised at random, an unexpected one not ignored
    broken = Path(shutil.copytree(ckpt, tmp_path / "missing-key"))
    state = load_file(broken / UNET_WEIGHTS)
    del state["conv_out.weight"]
    save_file(state, broken / UNET_WEIGHTS)
    assert load_error(broken).endswith("UNet weights do not match "
                                       f"{broken / 'unet' / 'config.json'}: missing keys conv_out.weight")

    broken = Path(shutil.copytree(ckpt, tmp_path / "unexpected-key"))
    state = load_file(broken / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.extra.weight"] = torch.zeros(3)
    state["decoder.other.bias"] = torch.zeros(3)
    save_file(state, broken / "vae" / "diffusion_pytorch_model.safetensors")
    assert load_error(broken).endswith(f"{broken / 'vae' / 'config.json'}: unexpected keys decoder.extra.weight, "
                                       "decoder.other.bias")

    broken = Path(shutil.copytree(ckpt, tmp_path / "prompt-width"))
    save_file({"prompt_embeds": torch.zeros(1, 77, 5)}, broken / "prompt_embeds.safetensors")
    message = load_error(broken)
    assert str(broken / "prompt_embeds.safetensors") in message and "(1, 77, 5) do not fit the UNet" in message


def test_pickled_weights_are_never_unpickled(ckpt, tmp_path):
    marker = tmp_path / "code-ran"
    trap = pickle.dumps({"conv_in.weight": PickleTrap(marker)})
    # only a pickle-based weights file: refused, not opened
    only_pickle = Path(shutil.copytree(ckpt, tmp_path / "only-pickle"))
    (only_pickle / UNET_WEIGHTS).unlink()
    (only_pickle / "unet" / "diffusion_pytorch_model.bin").write_bytes(trap)
    assert "no .safetensors weights for the UNet" in load_error(only_pickle)
    # both: the safetensors are used, the pickle is never touched
    both = Path(shutil.copytree(ckpt, tmp_path / "both"))
    for folder in ("unet", "vae"):
        (both / folder / "diffusion_pytorch_model.bin").write_bytes(trap)
    D3Predictor.from_pretrained(both, device="cpu")
    assert not marker.exists()


@pytest.mark.quick
def test_the_official_pth_is_read_weights_only(tmp_path):
    convert = pytest.importorskip("d3.convert")
    marker = tmp_path / "code-ran"
    pth = tmp_path / "depth.pth"
    torch.save({"unet.conv_in.weight": torch.zeros(1), "hook": PickleTrap(marker)}, pth)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        convert.read_official_state_dict(pth)
    assert str(pth) in str(info.value) and not marker.exists()
    # plain tensors still load
    torch.save({"unet.conv_in.weight": torch.ones(2)}, pth)
    assert torch.equal(convert.read_official_state_dict(pth)["unet.conv_in.weight"], torch.ones(2))


def test_a_resume_state_is_read_weights_only(tmp_path):
    """accelerate's load_state (used by --resume_from_checkpoint) refuses a training state with code in it."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    accelerator.save_state(str(tmp_path / "state"))
    accelerator.load_state(str(tmp_path / "state"))  # the genuine state loads
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": PickleTrap(marker)}, tmp_path / "state" / "optimizer.bin")
    with pytest.raises(pickle.UnpicklingError):
        accelerator.load_state(str(tmp_path / "state"))
    assert not marker.exists()


# -- nothing in the repository unpickles -----------------------------------------------------------------------
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
              "dill.loads", "joblib.load", "cloudpickle.load", "cloudpickle.loads", "pandas.read_pickle",
              "pd.read_pickle", "torch.serialization.load"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unpickling_calls(source: str, filename: str) -> list[str]:
    """Calls that could unpickle: torch.load without weights_only=True, pickle & co., np.load(allow_pickle=True)."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "dill", "joblib"):
            names = [a.name for a in node.names if a.name in ("load", "loads", "Unpickler")]
            if names:
                found.append(f"{filename}:{node.lineno}: from {node.module} import {', '.join(names)}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        constant = lambda key: getattr(keywords.get(key), "value", None)  # noqa: E731
        if name == "torch.load" and constant("weights_only") is not True:
            found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        elif name in UNPICKLERS:
            found.append(f"{filename}:{node.lineno}: {name}")
        elif name in ("np.load", "numpy.load") and constant("allow_pickle") is not False and "allow_pickle" in keywords:
            found.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
    return found


def test_the_scanner_finds_what_it_should():
    bad = ("import pickle, torch, numpy as np\nfrom pickle import loads\ntorch.load(f)\n"
           "torch.load(f, weights_only=False)\npickle.load(f)\nnp.load(f, allow_pickle=True)\n")
    assert len(unpickling_calls(bad, "x.py")) == 5
    good = "torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f, allow_pickle=False)\nnp.load(f)\n"
    assert unpickling_calls(good, "y.py") == []


def test_nothing_in_the_repository_unpickles():
    files = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "site-packages" not in p.parts]
    assert len(files) > 20
    found = [hit for p in files for hit in unpickling_calls(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert found == []
