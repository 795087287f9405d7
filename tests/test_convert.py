"""The authors' released .pth: strict loading of its exact key layout, parity with a direct computation, conversion."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d3.checkpoint import PROMPTS, CheckpointError
from d3.convert import load_official_predictor
from d3.loading import load_predictor
from d3.official_release import OfficialCheckpointError, infer_task, read_official_state_dict, split_official_state_dict
from d3.predictor import D3Predictor

TIMESTEP = 260.0  # what the release stores: 261 is not representable in bf16


def student_weights(backbone: Path) -> dict[str, torch.Tensor]:
    """The tiny UNet moved away from the base weights (so a loader that ignores the file fails), rounded to bf16."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(backbone / "unet").state_dict()
    g = torch.Generator().manual_seed(1)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}


def official_layout(backbone: Path, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every kind of key the authors' training module saves (docs/protocols.md,
    "Training recipe"), in bf16 as DeepSpeed writes it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(backbone / "unet").state_dict()
    vae = AutoencoderKL.from_pretrained(backbone / "vae").state_dict()
    state = {f"d3_predictor.{k}": v for k, v in student.items()}
    state["timestep"] = torch.tensor(261.0).to(torch.bfloat16)
    state.update({f"visual_experts.{k}": v.to(torch.bfloat16) for k, v in teacher.items()})
    state.update({f"ae.ae.{k}": v.to(torch.bfloat16) for k, v in vae.items()})
    for key in ("mid", "us1", "us10"):
        for layer in range(3):
            state[f"adapters.{key}.layers.{layer}.norm.linear.weight"] = torch.zeros(32, 16, dtype=torch.bfloat16)
            state[f"adapters.{key}.layers.{layer}.up_proj.weight"] = torch.randn(64, 32).to(torch.bfloat16)
            state[f"adapters.{key}.layers.{layer}.down_proj.weight"] = torch.zeros(32, 32, dtype=torch.bfloat16)
    state["mapping.in_norm.scale"] = torch.ones(16, dtype=torch.bfloat16)
    state["mapping.blocks.0.up_proj.weight"] = torch.randn(48, 16).to(torch.bfloat16)
    state["mapping.out_norm.scale"] = torch.ones(16, dtype=torch.bfloat16)
    state["time_emb.weight"] = torch.randn(8, 1).to(torch.bfloat16)
    state["time_in_proj.weight"] = torch.randn(16, 16).to(torch.bfloat16)
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_backbone_dir):
    student = student_weights(tiny_backbone_dir)
    state = official_layout(tiny_backbone_dir, student)
    path = tmp_path_factory.mktemp("official") / "depth_checkpoint.pth"
    torch.save(state, path)
    return path, state, student


@pytest.fixture(scope="module")
def official_predictor(release, tiny_backbone_dir):
    return load_official_predictor(release[0], tiny_backbone_dir, device="cpu")


@torch.no_grad()
def direct_depth(backbone: Path, student: dict, image: np.ndarray, square: int | None = None) -> np.ndarray:
    """The authors' procedure written out with diffusers calls only (VAE mean instead of a posterior sample)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(backbone / "unet").eval()
    unet.load_state_dict({k: v.float() for k, v in student.items()})
    vae = AutoencoderKL.from_pretrained(backbone / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(backbone / "tokenizer")
    ids = tokenizer(PROMPTS["depth"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    prompt_embeds = CLIPTextModel.from_pretrained(backbone / "text_encoder")(ids)[0]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    height, width = image.shape[:2]
    if square:
        x = F.interpolate(x, size=(square, square), mode="bilinear", align_corners=False)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    out = unet(z, torch.tensor(TIMESTEP), encoder_hidden_states=prompt_embeds).sample
    decoded = vae.decode(out / vae.config.scaling_factor).sample
    if square:
        decoded = F.interpolate(decoded, size=(height, width), mode="bilinear", align_corners=False)
    return (decoded / 2 + 0.5).clamp(0, 1).mean(1)[0].numpy()


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.quick
def test_release_loads_strictly_and_equals_a_direct_computation(official_predictor, release, tiny_backbone_dir):
    path, _, student = release
    config = official_predictor.config
    assert (config.task, config.student_timestep, config.prompt) == ("depth", TIMESTEP, PROMPTS["depth"])
    assert config.resize_mode == "keep_aspect"  # our aspect-preserving path stays the default
    for name, value in official_predictor.unet.state_dict().items():
        assert torch.equal(value, student[name].float()), name  # every student weight came from the file
    img = image(64, 64)
    pred = official_predictor.predict([img], processing_res=64)[0]
    ref = direct_depth(tiny_backbone_dir, student, img)
    np.testing.assert_allclose(pred, ref, atol=2e-6, rtol=0)
    base = D3Predictor(*_base_parts(tiny_backbone_dir), official_predictor.config, device="cpu")
    assert np.abs(base.predict([img], processing_res=64)[0] - pred).max() > 1e-3  # the student is not the base


def _base_parts(backbone: Path):
    from d3.backbone import encode_prompt, load_backbone

    b = load_backbone(str(backbone))
    return b.unet, b.vae, encode_prompt(b.tokenizer, b.text_encoder, PROMPTS["depth"])


def test_official_preprocess_is_the_authors_squash_both_ways(release, tiny_backbone_dir):
    path, _, student = release
    predictor = load_predictor(path, device="cpu", pretrained_model_name_or_path=tiny_backbone_dir,
                               official_preprocess=True)
    assert (predictor.config.resize_mode, predictor.config.processing_res) == ("squash", 768)
    img = image(40, 88, seed=3)  # squashed up to 64 rows, then back down to 40 without antialiasing
    pred = predictor.predict([img], processing_res=64)[0]  # the tiny UNet at 768x768 would be needlessly slow
    assert pred.shape == (40, 88)
    np.testing.assert_allclose(pred, direct_depth(tiny_backbone_dir, student, img, square=64), atol=2e-6, rtol=0)


@pytest.mark.parametrize("wrap", ["module", "state_dict", "ddp_prefix", "safetensors"])
def test_deepspeed_lightning_and_safetensors_files_read_the_same(tmp_path, release, wrap):
    from safetensors.torch import save_file

    _, state, _ = release
    if wrap == "safetensors":
        renamed = {("d3_predictor.timestep" if k == "timestep" else k): v.contiguous() for k, v in state.items()}
        path = tmp_path / "depth.safetensors"
        save_file(renamed, str(path))
    else:
        path = tmp_path / "depth.pth"
        if wrap == "ddp_prefix":
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        else:  # DeepSpeed's model-states file and Lightning's checkpoint keep more than the weights
            extra = {"global_steps": 30000, "ds_version": "0.15.0", "lr_scheduler": {"lr": [3e-5]}}
            torch.save({wrap: state, **extra}, path)
    read = read_official_state_dict(path)
    plain = {("timestep" if k == "d3_predictor.timestep" else k): v for k, v in read.items()}
    assert plain.keys() == state.keys()
    assert all(torch.equal(plain[k], v) for k, v in state.items())


def _unet_reference(backbone: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(backbone / "unet").state_dict()


def test_every_key_is_accounted_for(release, tiny_backbone_dir):
    _, state, student = release
    weights = split_official_state_dict(state, _unet_reference(tiny_backbone_dir), "depth_checkpoint.pth")
    assert weights.unet.keys() == student.keys() and weights.timestep == TIMESTEP
    n_teacher = len(student)
    assert weights.ignored["visual_experts."] == n_teacher
    assert weights.ignored["adapters."] == 27 and weights.ignored["mapping."] == 3
    assert weights.ignored["time_emb."] == weights.ignored["time_in_proj."] == 1 and weights.ignored["ae."] > 0
    assert len(weights.unet) + 1 + sum(weights.ignored.values()) == len(state)


def test_unexpected_missing_and_misshapen_keys_are_listed(release, tiny_backbone_dir):
    _, state, _ = release
    bad = dict(state)
    del bad["d3_predictor.conv_in.bias"], bad["d3_predictor.conv_out.weight"]
    bad["d3_predictor.extra_head.weight"] = torch.zeros(1)
    bad["discriminator.weight"] = torch.zeros(1)
    bad["d3_predictor.conv_norm_out.weight"] = torch.zeros(7)
    with pytest.raises(OfficialCheckpointError) as err:
        split_official_state_dict(bad, _unet_reference(tiny_backbone_dir), "depth_checkpoint.pth")
    msg = str(err.value)
    assert msg.startswith("depth_checkpoint.pth:")
    for name in ("d3_predictor.conv_in.bias", "d3_predictor.conv_out.weight", "d3_predictor.extra_head.weight",
                 "discriminator.weight", "d3_predictor.conv_norm_out.weight (7,)"):
        assert name in msg, name
    assert "2 student UNet weights missing" in msg and "2 unexpected keys" in msg


def test_a_bad_release_file_fails_naming_it(tmp_path, release, tiny_backbone_dir):
    _, state, _ = release
    missing_step = tmp_path / "depth_no_timestep.pth"
    torch.save({k: v for k, v in state.items() if k != "timestep"}, missing_step)
    with pytest.raises(OfficialCheckpointError, match="no learned timestep"):
        load_official_predictor(missing_step, tiny_backbone_dir, device="cpu")
    assert load_official_predictor(missing_step, tiny_backbone_dir, device="cpu",
                                   student_timestep=500).config.student_timestep == 500
    pickled = tmp_path / "depth_pickle.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)  # arbitrary objects are never unpickled
    with pytest.raises(OfficialCheckpointError, match=r"depth_pickle\.pth: cannot be read as tensors only"):
        read_official_state_dict(pickled)
    with pytest.raises(OfficialCheckpointError, match="needs its Stable Diffusion 2.1 base"):
        load_official_predictor(release[0], tmp_path / "no-such-sd21", device="cpu")
    with pytest.raises(CheckpointError, match="no such checkpoint folder or file"):
        load_predictor(tmp_path / "nothing.pth")


@pytest.mark.quick
def test_task_comes_from_the_file_name_or_the_flag():
    assert infer_task("ckpts/depth_checkpoint.pth") == "depth"
    assert infer_task("normal_checkpoint.pth") == "normal"
    assert infer_task("releases/matting/model.pth") == "matting"
    assert infer_task("model.pth", "normal") == "normal"
    with pytest.raises(OfficialCheckpointError, match="pass --task"):
        infer_task("ckpts/model.pth")
    with pytest.raises(OfficialCheckpointError, match="several tasks"):
        infer_task("depth_and_normal.pth")


def test_convert_cli_writes_a_checkpoint_folder_with_the_same_outputs(tmp_path, release, official_predictor,
                                                                      tiny_backbone_dir):
    from d3.convert import main

    out = tmp_path / "converted"
    assert main([str(release[0]), "--output", str(out), "--pretrained_model_name_or_path", str(tiny_backbone_dir)]) == 0
    converted = D3Predictor.from_pretrained(out, device="cpu")
    assert converted.config == official_predictor.config
    images = [image(64, 64), image(48, 80, seed=5)]
    expected = official_predictor.predict(images, processing_res=64)
    for a, b in zip(converted.predict(images, processing_res=64), expected):
        np.testing.assert_array_equal(a, b)


def test_infer_and_evaluate_accept_the_release(tmp_path, release, official_predictor, tiny_backbone_dir):
    import infer
    from d3.evaluation import load_predictor as eval_load_predictor
    from PIL import Image

    img = image(48, 80, seed=7)
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "a.png")
    common = ["--input", str(tmp_path / "in"), "--checkpoint", str(release[0]), "--processing_res", "64",
              "--device", "cpu", "--pretrained_model_name_or_path", str(tiny_backbone_dir)]
    assert infer.main([*common, "--output", str(tmp_path / "ours")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ours" / "a_depth.npy"),
                                  official_predictor.predict([img], processing_res=64)[0])
    assert infer.main([*common, "--output", str(tmp_path / "official"), "--official_preprocess"]) == 0
    squashed = official_predictor.predict([img], processing_res=64, resize_mode="squash")[0]
    np.testing.assert_array_equal(np.load(tmp_path / "official" / "a_depth.npy"), squashed)

    predictor = eval_load_predictor(str(release[0]), torch.device("cpu"),
                                    pretrained_model_name_or_path=str(tiny_backbone_dir))
    assert predictor.task == "depth" and predictor.config.student_timestep == TIMESTEP
    # evaluate.py scores the release as the paper did: the authors' 768x768 squash, unless told otherwise
    assert (predictor.config.resize_mode, predictor.config.processing_res) == ("squash", 768)
    kept = eval_load_predictor(str(release[0]), torch.device("cpu"), str(tiny_backbone_dir), resize_mode="keep_aspect")
    assert (kept.config.resize_mode, kept.config.processing_res) == ("keep_aspect", 768)
