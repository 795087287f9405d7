"""The authors'-step oracle (tests/authors_oracle.py) checked on its own, on fixture folders in the authors' layouts."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

from tests.authors_oracle import (
    SD21_FEATURE_DIMS,
    AuthorsHeads,
    authors_step,
    depth_losses,
    draw_timesteps,
    load_batch,
    unet_features,
)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
RES = 32  # tiny VAE: 4x down, an 8x8 latent


# ------------------------------------------------------------------------------------------------- fixtures
def _rgb(path: Path, h: int, w: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _h5(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("depth", data=array)


def _scene(h: int, w: int, lo: float, hi: float) -> np.ndarray:
    ii, jj = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    return (lo + (hi - lo) * (0.3 * ii + 0.7 * jj)).astype(np.float32)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory) -> Path:
    """Hypersim GT smaller than the RGB, vKITTI larger, COCO of another aspect; a few invalid pixels each."""
    root, rng = tmp_path_factory.mktemp("depth"), np.random.default_rng(0)
    for stem, ext, rgb_hw, gt_hw, far in [("ai_001_001", ".png", (48, 64), (24, 40), 70.0),
                                          ("Scene01_00001", ".jpg", (30, 90), (48, 100), 90.0),
                                          ("coco_0001", ".jpg", (40, 40), (40, 20), 10.0)]:
        _rgb(root / "rgb" / f"{stem}{ext}", *rgb_hw, rng)
        metric = _scene(*gt_hw, 0.5, far)
        metric[0, :3] = 0.0
        _h5(root / "depth_ori" / f"{stem}.h5", metric)
        norm = (metric - metric.min()) / (metric.max() - metric.min())
        _h5(root / "depth" / f"{stem}.h5", np.repeat(norm[..., None], 3, axis=-1))
        (root / f"{stem}.json").write_text(json.dumps({"caption": ""}))  # the authors' loaders require it
    return root


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory) -> Path:
    root, rng = tmp_path_factory.mktemp("normal"), np.random.default_rng(1)
    for stem, rgb_hw, gt_hw in [("sintel_a", (36, 36), (20, 28)), ("room_b", (24, 48), (50, 30))]:
        _rgb(root / "rgb" / f"{stem}.png", *rgb_hw, rng)
        n = rng.normal(size=(*gt_hw, 3)).astype(np.float32)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n[:2, :2] = 0.0  # invalid
        _h5(root / "normal" / f"{stem}.h5", n)
    return root


@pytest.fixture(scope="module")
def matting_dir(tmp_path_factory) -> Path:
    root, rng = tmp_path_factory.mktemp("matting"), np.random.default_rng(2)
    for stem, hw in [("p_1", (40, 30)), ("p_2", (50, 70))]:
        _rgb(root / "blurred_image" / f"{stem}.jpg", *hw, rng)
        (root / "mask").mkdir(exist_ok=True)
        Image.fromarray((_scene(*hw, 0, 255)).astype(np.uint8), mode="L").save(root / "mask" / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def models(tiny_backbone_dir):
    d = tiny_backbone_dir
    teacher = UNet2DConditionModel.from_pretrained(d / "unet").double().eval().requires_grad_(False)
    student = UNet2DConditionModel.from_pretrained(d / "unet").double().train()
    vae = AutoencoderKL.from_pretrained(d / "vae").double().eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(d / "scheduler")
    return student, teacher, vae, scheduler


def _tiny_dims(student) -> dict[str, int]:
    x = torch.zeros(1, 4, RES // 4, RES // 4, dtype=torch.float64)
    with torch.no_grad():
        feats = unet_features(student, x, torch.tensor([1]), torch.zeros(1, 3, 32, dtype=torch.float64))
    return {k: v.shape[1] for k, v in feats.items() if k != "sample"}


# ---------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("hw", [(8, 8), (10, 6)])  # 10x6 is not a multiple of 4: diffusers forwards upsample sizes
def test_hand_walk_equals_diffusers_forward(models, hw):
    unet = models[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        feats = unet_features(unet, x, t, ctx)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    assert list(feats) == ["mid"] + [f"us{i}" for i in range(1, 8)] + ["sample"]
    assert torch.allclose(feats["sample"], ref, rtol=0, atol=1e-6)
    assert [feats[f"us{i}"].shape[1] for i in range(1, 8)] == [64, 64, 64, 64, 64, 64, 32]


def test_sd21_walk_gives_the_authors_keys_and_channels():
    from d3.tiny import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd21"))
        feats = unet_features(unet, torch.empty(1, 4, 16, 16), torch.tensor([5]), torch.empty(1, 77, 1024))
    assert {k: v.shape[1] for k, v in feats.items() if k != "sample"} == SD21_FEATURE_DIMS


# ------------------------------------------------------------------------------------------------- heads
def test_heads_names_and_sd21_parameter_count():
    with torch.device("meta"):
        heads = AuthorsHeads(SD21_FEATURE_DIMS)
    assert sum(p.numel() for p in heads.parameters()) == 125_047_808
    keys = list(heads.state_dict())
    assert keys[:10] == ["time_emb.weight", "time_in_proj.weight", "mapping.in_norm.scale",
                         "mapping.blocks.0.norm.scale", "mapping.blocks.0.up_proj.weight",
                         "mapping.blocks.0.down_proj.weight", "mapping.blocks.1.norm.scale",
                         "mapping.blocks.1.up_proj.weight", "mapping.blocks.1.down_proj.weight",
                         "mapping.out_norm.scale"]
    assert keys[10:15] == [f"adapters.mid.layers.0.{n}" for n in ("norm.linear.weight", "up_proj.weight",
                                                                  "down_proj.weight")] + [
        "adapters.mid.layers.1.norm.linear.weight", "adapters.mid.layers.1.up_proj.weight"]
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    assert shapes["time_emb.weight"] == (128, 1) and shapes["mapping.blocks.0.up_proj.weight"] == (1536, 256)
    assert shapes["adapters.us10.layers.2.up_proj.weight"] == (640, 320)
    assert shapes["adapters.us7.layers.0.norm.linear.weight"] == (640, 256)
    assert len(keys) == 10 + 11 * 3 * 3


def test_fresh_heads_are_identity_and_load_strictly():
    dims = {"mid": 16, "us1": 8}
    heads = AuthorsHeads(dims, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    tokens = {k: torch.randn(6, 5, c, generator=g, dtype=torch.float64) for k, c in dims.items()}
    t = torch.tensor([1, 300, 998, 5, 400, 999])
    out = heads(tokens, t)
    assert all(torch.equal(out[k], tokens[k]) for k in dims)
    x = torch.randn(6, 256, generator=g, dtype=torch.float64)
    m = heads.mapping
    assert torch.equal(m(x), m.out_norm(m.in_norm(x)))
    c = heads.condition(t)
    assert c.shape == (6, 256) and torch.allclose(c.pow(2).mean(-1), torch.ones(6, dtype=torch.float64))
    other = AuthorsHeads(dims).double()
    other.load_state_dict(heads.state_dict(), strict=True)
    assert torch.equal(other.condition(t), c)


# ------------------------------------------------------------------------------------------ depth losses
def _as_decoded(p01: torch.Tensor) -> torch.Tensor:
    """A 'decoded' image (1, 3, H, W) whose postprocessed channel mean is p01 (H, W)."""
    return (p01 * 2 - 1)[None, None].expand(1, 3, *p01.shape).clone()


@pytest.mark.quick
def test_ssi_zero_for_an_affine_prediction_and_masks_invalid_pixels():
    d = torch.from_numpy(_scene(16, 16, 1.0, 60.0)).double()[None]
    p = (d[0] - 1.0) / 80.0 + 0.1  # an affine map of the depth, inside [0, 1]
    dec = _as_decoded(p)
    d_bad = d.clone()
    d_bad[0, :3, :4] = 0.0  # invalid: the prediction there is not affine to it and must not count
    terms = depth_losses(dec, dec, [d_bad], [(1e-5, 65.0)], n_t=1)
    assert terms["ssi_sample"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["mse_sample"].item() == 0.0 and terms["gradient"].item() == pytest.approx(0.0, abs=1e-15)


def test_ssi_matches_least_squares_and_failed_copies_count_as_zero():
    rng = np.random.default_rng(3)
    d = torch.from_numpy(rng.uniform(1, 50, (1, 12, 12))).double()
    p = torch.from_numpy(rng.uniform(0.05, 0.95, (12, 12))).double()
    a = np.stack([p.numpy().ravel(), np.ones(144)], 1)
    s, b = np.linalg.lstsq(a, d.numpy().ravel(), rcond=None)[0]
    want = np.abs(a @ [s, b] - d.numpy().ravel()).mean()
    flat = torch.full((12, 12), 0.5, dtype=torch.float64)  # det = 0: a failed fit, counted as 0
    dec = torch.cat([_as_decoded(p), _as_decoded(flat)])
    terms = depth_losses(dec, dec[:1], [d], [(1e-5, 80.0)], n_t=2)
    assert terms["ssi_sample"].item() == pytest.approx(want / 2, rel=1e-6)


def test_gradient_loss_falls_back_to_one_pixel_steps_on_tiny_gt():
    d = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 6.0]]], dtype=torch.float64)
    p = torch.tensor([[0.1, 0.4, 0.2, 0.8, 0.3], [0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    tgt = torch.zeros(1, 3, 2, 5, dtype=torch.float64)  # target 0.5 in [0, 1] everywhere: log1p constant
    terms = depth_losses(_as_decoded(p), tgt, [d], [(1e-5, 80.0)], n_t=1)
    r = torch.log1p(p)
    want = ((r[:, 1:] - r[:, :-1]).abs().sum() + (r[1:] - r[:-1]).abs().sum()) / (2 * 4 + 5)
    assert terms["gradient"].item() == pytest.approx(want.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------- full steps
def _run(models, root, stems, task, **kw):
    student, teacher, vae, scheduler = models
    student.zero_grad(set_to_none=True)
    timestep = torch.nn.Parameter(torch.tensor(261.0))
    heads = kw.pop("heads", "fresh")
    if heads == "fresh":
        heads = AuthorsHeads(_tiny_dims(student), generator=torch.Generator().manual_seed(0)).double()
    prompt = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gen = torch.Generator().manual_seed(42)
    out = authors_step(student, timestep, teacher, vae, scheduler, heads, prompt, str(root), stems, task, RES,
                       gen, **kw)
    out.total.backward()
    return out, timestep, heads


def _check_finite_with_gradients(models, out, timestep, heads):
    student, teacher = models[0], models[1]
    assert torch.isfinite(out.total) and all(torch.isfinite(v) for v in out.task.values())
    assert all(0.0 <= v.item() <= 2.0 for v in out.align.values())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert timestep.grad is not None and torch.isfinite(timestep.grad) and timestep.grad != 0
    assert all(p.grad is None for p in teacher.parameters())
    if heads is not None:
        for k in heads.adapters:
            g = heads.adapters[k].layers[2].down_proj.weight.grad
            assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_depth_step_with_gt_smaller_larger_and_other_aspect(models, depth_dir):
    stems = ["ai_001_001", "Scene01_00001.jpg", "coco_0001"]
    out, timestep, heads = _run(models, depth_dir, stems, "depth")
    assert set(out.task) == {"mse_sample", "ssi_sample", "gradient"}
    assert out.prediction.shape == (9, 3, RES, RES) and list(out.align) == ["mid"] + [f"us{i}" for i in range(1, 8)]
    batch = out.batch
    assert [tuple(n.shape) for n in batch["native"]] == [(1, 24, 40), (1, 48, 100), (1, 40, 20)]
    assert batch["ranges"] == [(1e-5, 65.0), (1e-5, 80.0), (1e-5, 80.0)]
    assert batch["target"].min() >= -1 and batch["target"].max() <= 1 and batch["rgb"].shape == (3, 3, RES, RES)
    w = 998 / 3
    assert all(1 + k * w <= t < 1 + (k + 1) * w for row in out.timesteps.tolist() for k, t in enumerate(row))
    want = sum(out.align.values()) + 8 * out.task["mse_sample"] + 2 * out.task["ssi_sample"] + 100 * out.task[
        "gradient"]
    assert torch.allclose(out.total, want, rtol=1e-12)
    _check_finite_with_gradients(models, out, timestep, heads)


def test_same_generator_same_draws_and_explicit_draws_override(models, depth_dir):
    a, _, _ = _run(models, depth_dir, ["coco_0001"], "depth")
    b, _, _ = _run(models, depth_dir, ["coco_0001"], "depth", timesteps=a.timesteps, noise=a.noise)
    assert torch.equal(a.timesteps, draw_timesteps(1, 3, torch.Generator().manual_seed(42)))
    assert torch.equal(a.total, b.total)


def test_normal_step(models, normal_dir):
    out, timestep, heads = _run(models, normal_dir, ["sintel_a", "room_b"], "normal", posterior="sample")
    assert set(out.task) == {"mse_sample", "angular_sample"} and 0 < out.task["angular_sample"] < np.pi
    _check_finite_with_gradients(models, out, timestep, heads)


def test_matting_step_without_heads(models, matting_dir):
    out, timestep, heads = _run(models, matting_dir, ["p_1", "p_2"], "matting", heads=None, n_t=2)
    assert set(out.task) == {"mse_sample", "l1_sample", "gradient"} and out.prediction.shape[0] == 4
    mask = load_batch(str(matting_dir), ["p_1"], "matting", RES)["target"]
    assert mask.shape == (1, 3, RES, RES) and torch.equal(mask[:, 0], mask[:, 2])
    _check_finite_with_gradients(models, out, timestep, heads)
