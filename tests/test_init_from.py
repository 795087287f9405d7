"""`--init_from depth_checkpoint.pth`: continue the authors' training from their release, heads included. The
student, the learned timestep and every projection-head tensor load strictly; the teacher and VAE are skipped; any
other key, a missing head key or a wrong shape stops the run naming them."""

from __future__ import annotations

import copy

import pytest
import torch

import train_depth
from d3.backbone import load_backbone
from d3.heads import ProjectionHeads
from d3.objective import D3Model
from d3.official_release import OfficialCheckpointError, load_official_training_state
from d3.training import build_parser, train


def _model(backbone_dir, head_type: str = "cleandift", layer_set: str = "up") -> D3Model:
    denoiser = load_backbone(backbone_dir).denoiser()
    student = type(denoiser)(copy.deepcopy(denoiser.model))
    layers = student.layer_set(layer_set)
    heads = ProjectionHeads(student.feature_channels(layers), head_type, student.head_names(layers))
    return D3Model(student, heads, layers)


def _release(backbone_dir, path) -> dict[str, torch.Tensor]:
    """A file in the authors' layout (bf16, as DeepSpeed saves it) whose every tensor differs from a fresh run's."""
    backbone = load_backbone(backbone_dir)
    source = _model(backbone_dir)
    g = torch.Generator().manual_seed(3)
    state = {}
    for k, v in source.student.state_dict().items():
        state[f"d3_predictor.{k}"] = (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
        state[f"visual_experts.{k}"] = v.to(torch.bfloat16)
    for k, v in source.heads.state_dict().items():  # the authors' names: adapters.us1.layers.0..., mapping..., time_*
        state[k] = (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
    state.update({f"ae.ae.{k}": v.to(torch.bfloat16) for k, v in backbone.vae.state_dict().items()})
    state["timestep"] = torch.tensor(261.0).to(torch.bfloat16)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_backbone_dir):
    path = tmp_path_factory.mktemp("release") / "depth_checkpoint.pth"
    return path, _release(tiny_backbone_dir, path)


def test_the_release_loads_into_student_timestep_and_heads(release, tiny_backbone_dir):
    path, state = release
    model = _model(tiny_backbone_dir)
    counts = load_official_training_state(path, model)
    for k, v in model.student.state_dict().items():
        assert torch.equal(v, state[f"d3_predictor.{k}"].float()), k
    for k, v in model.heads.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    assert float(model.student_timestep.detach()) == 260.0  # 261 is not representable in bf16
    n_unet = len(model.student.state_dict())
    assert counts == {"student": n_unet, "timestep": 1, "heads": len(model.heads.state_dict()),
                      "visual_experts.": n_unet, "ae.": sum(1 for k in state if k.startswith("ae."))}


def test_heads_that_do_not_match_are_listed(release, tiny_backbone_dir, tmp_path):
    path, state = release
    with pytest.raises(OfficialCheckpointError, match="projection-head keys this run has no head for"):
        load_official_training_state(path, _model(tiny_backbone_dir, head_type="linear"))
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "mapping.blocks.1.down_proj.weight"}, missing)
    with pytest.raises(OfficialCheckpointError, match=r"1 projection-head keys missing: mapping\.blocks\.1\.down_proj"):
        load_official_training_state(missing, _model(tiny_backbone_dir))
    wrong = tmp_path / "wrong.pth"
    torch.save({**state, "time_in_proj.weight": torch.zeros(256, 128)}, wrong)
    with pytest.raises(OfficialCheckpointError, match=r"time_in_proj\.weight \(256, 128\) \(expected \(256, 256\)\)"):
        load_official_training_state(wrong, _model(tiny_backbone_dir))
    stray = tmp_path / "stray.pth"
    torch.save({**state, "optimizer.step": torch.zeros(1)}, stray)
    with pytest.raises(OfficialCheckpointError, match="unexpected keys.*optimizer.step"):
        load_official_training_state(stray, _model(tiny_backbone_dir))


def test_train_continues_from_the_release(release, tiny_backbone_dir, synthetic_train_dir, tmp_path, one_thread):
    path, state = release
    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
        "--output_dir", str(tmp_path / "run"), "--resolution", "32", "--train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_train_steps", "1", "--lr_warmup_steps", "0",
        "--learning_rate", "0", "--adam_weight_decay", "0", "--dataloader_num_workers", "0", "--report_to", "none",
        "--init_from", str(path)])
    result = train(args, train_depth.RECIPE)
    from d3.predictor import D3Predictor

    exported = D3Predictor.from_pretrained(result.output_dir, device="cpu")
    for k, v in exported.unet.state_dict().items():  # lr 0: the exported student is the release's
        assert torch.equal(v, state[f"d3_predictor.{k}"].float()), k
    assert exported.config.student_timestep == 260.0

    args.init_from = str(tmp_path / "nope.pth")
    args.output_dir = str(tmp_path / "run2")
    with pytest.raises(SystemExit, match="--init_from: .*nope.pth: no such file"):
        train(args, train_depth.RECIPE)
