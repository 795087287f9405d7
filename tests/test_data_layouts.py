"""Training folders: the matting layouts other tools write, and depth pseudo-labels stored as disparity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_depth
import train_matting
from d3.data.folders import TrainingFolder
from d3.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.quick


def _write_pair(root, image_dir, alpha_dir, name, alpha, seed):
    h, w = alpha.shape
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / alpha_dir).mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / image_dir / f"{name}.jpg", quality=95)
    Image.fromarray(alpha).save(root / alpha_dir / f"{name}.png")


@pytest.mark.parametrize("image_dir, alpha_dir", [("image", "mask"), ("images", "alphas"), ("images", "masks"),
                                                   ("blurred_image", "mask"), ("rgb", "alpha")])
def test_matting_folder_layouts_pair_images_and_mattes_by_name(tmp_path, image_dir, alpha_dir):
    alphas = {}
    for i, name in enumerate(("p_01", "p_02")):
        alpha = np.zeros((12, 16), np.uint8)
        alpha[2:10, 3 + i : 12] = 255
        alpha[10, 3:12] = 128
        _write_pair(tmp_path, image_dir, alpha_dir, name, alpha, seed=i)
        alphas[name] = alpha
    ds = TrainingFolder(tmp_path, "alpha", 16, encode_target=train_matting.encode_alpha_target)
    assert [p.stem for p, _, _ in ds.items] == ["p_01", "p_02"]
    for (image, target, _), name in zip(ds.items, alphas):
        assert image.parent.name == image_dir and target == tmp_path / alpha_dir / f"{name}.png"
    sample = ds[1]
    # the 8-bit matte squashed with PIL's bilinear filter in 8 bits, as the authors' loader does
    resized = Image.fromarray(alphas["p_02"]).resize((16, 16), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None]
    torch.testing.assert_close(sample["target"][:1], expected * 2 - 1, atol=1e-6, rtol=0)


def test_a_matte_already_at_the_training_size_is_scaled_like_any_other(tmp_path):
    """An 8-bit matte of exactly R×R was handed on as raw uint8 (a wrapped-around uint8 target); a float matte of
    R×R was not clipped. Both now take the path of every other size (PIL's resize to the same size is the identity)."""
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 2:9] = 255
    alpha[12, 2:9] = 77
    _write_pair(tmp_path / "eight", "images", "masks", "a", alpha, seed=0)
    encode = train_matting.encode_alpha_target
    target = TrainingFolder(tmp_path / "eight", "alpha", 16, encode_target=encode)[0]["target"]
    expected = torch.from_numpy(alpha.astype(np.float32) / np.float32(255))[None] * 2 - 1
    assert target.dtype == torch.float32 and torch.equal(target, expected.expand(3, -1, -1))

    floats = tmp_path / "float"
    _write_pair(floats, "images", "masks", "b", alpha, seed=1)
    (floats / "masks" / "b.png").unlink()
    np.save(floats / "masks" / "b.npy", alpha.astype(np.float32) / 200)  # up to 1.275: clipped to 1
    target = TrainingFolder(floats, "alpha", 16, encode_target=encode)[0]["target"]
    assert float(target.max()) == 1.0 and float(target.min()) == -1.0


def test_a_folder_without_the_expected_subfolders_names_what_it_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "mask").mkdir()
    (tmp_path / ".cache").mkdir()  # hidden: not listed
    with pytest.raises(ValueError) as err:
        TrainingFolder(tmp_path, "alpha", 16, encode_target=train_matting.encode_alpha_target)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "no image folder (expected one of rgb/, image/, images/, blurred_image/, original_image/)" in msg
    assert "no alpha folder" not in msg  # mask/ is a matte folder
    assert "its subfolders are mask/, photos/" in msg and ".cache" not in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no image folder .* and no alpha folder \(expected one of alpha/, "
                                         r"alphas/, mask/, masks/\).*it has no subfolders"):
        TrainingFolder(empty, "alpha", 16, encode_target=train_matting.encode_alpha_target)


# ---------------------------------------------------------------------------------------------- depth_kind
SCALE = 37.25  # an arbitrary disparity unit


def _disparity_copy(metric_root, root, scale=SCALE):
    """The same scenes, each depth stored as scale / depth; invalid pixels as 0 or as negative disparity."""
    shutil.copytree(metric_root / "rgb", root / "rgb")
    (root / "depth").mkdir()
    for f in sorted((metric_root / "depth").glob("*.npy")):
        depth = np.load(f).astype(np.float64)
        disparity = np.where(depth > 0, scale / np.where(depth > 0, depth, 1), 0.0)
        disparity[(depth <= 0) & (np.arange(depth.size).reshape(depth.shape) % 2 == 1)] = -0.5
        np.save(root / "depth" / f.name, disparity.astype(np.float32))
    (root / "d3_dataset.json").write_text(json.dumps({"source": "coco", "depth_kind": "relative_inverse",
                                                      "model": "some/relative-model"}))
    return root


def test_relative_inverse_labels_give_the_target_of_the_depth_itself(tmp_path):
    metric = write_synthetic_dataset(tmp_path / "metric", 3, 24, 32, seed=5, tasks=("depth",), invalid_fraction=0.15)
    inverse = _disparity_copy(metric, tmp_path / "inverse")
    encode = train_depth.encode_depth_target
    from_depth = TrainingFolder(metric, "depth", 16, encode_target=encode)
    from_disparity = TrainingFolder(inverse, "depth", 16, encode_target=encode)
    assert (from_disparity.meta.min_depth, from_disparity.meta.max_depth) == (0.0, float("inf"))
    for i in range(len(from_depth)):
        a, b = from_depth[i], from_disparity[i]
        assert a["valid"].any() and not a["valid"].all()  # the scenes have invalid rectangles
        assert torch.equal(a["valid"], b["valid"])
        torch.testing.assert_close(b["gt"] * b["valid"] * SCALE, a["gt"] * a["valid"], rtol=1e-6, atol=0)
        torch.testing.assert_close(b["target"], a["target"], rtol=0, atol=1e-5)
        raw = np.load(inverse / "depth" / f"scene_{i:05d}.npy")
        raw_valid = np.asarray(from_disparity._load_target(from_disparity.items[i][1], None)["depth"][0]) > 0
        np.testing.assert_array_equal(raw_valid, raw > 0)  # ≤ 0 (zero and negative disparity) = invalid
    # Read as if it were depth (what happened before), near and far swap: the target is inverted.
    as_depth = TrainingFolder(inverse, "depth", 16, encode_target=encode,
                              meta=type(from_depth.meta)(source="coco", min_depth=0.0, max_depth=float("inf")))
    a, wrong = from_depth[0], as_depth[0]
    corr = np.corrcoef(a["target"][0].flatten().numpy(), wrong["target"][0].flatten().numpy())[0, 1]
    assert corr < 0


def test_relative_inverse_conversion_keeps_bad_values_out(tmp_path):
    root = tmp_path / "inv"
    (root / "depth").mkdir(parents=True)
    Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(tmp_path / "x.png")
    (root / "rgb").mkdir()
    shutil.copy(tmp_path / "x.png", root / "rgb" / "a.png")
    shutil.copy(tmp_path / "x.png", root / "rgb" / "b.png")
    disparity = np.array([[2.0, 0.5, 0.0, -1.0, 1e-45, 4e3]] * 4, np.float32)  # 1e-45: 1/d overflows float32
    np.save(root / "depth" / "a.npy", disparity)
    np.save(root / "depth" / "b.npy", np.where(disparity == 2.0, np.nan, disparity).astype(np.float32))
    (root / "d3_dataset.json").write_text(json.dumps({"depth_kind": "relative_inverse"}))
    ds = TrainingFolder(root, "depth", 6, encode_target=train_depth.encode_depth_target)
    depth = ds._load_target(ds.items[0][1], None)["depth"][0, 0].numpy()
    np.testing.assert_array_equal(depth, np.array([0.5, 2.0, 0.0, 0.0, 0.0, 1 / 4e3], np.float32))
    from d3.data.folders import BadSampleError

    with pytest.raises(BadSampleError, match=r"b\.npy: depth contains NaN"):
        ds[1]


def test_relative_depth_is_not_cut_by_a_metric_range_and_unknown_kinds_fail(tmp_path):
    root = tmp_path / "rel"
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(root / "rgb" / "a.png")
    np.save(root / "depth" / "a.npy", np.array([[0.0, 1e-7, 500.0, 2e4]] * 4, np.float32))
    (root / "d3_dataset.json").write_text(json.dumps({"depth_kind": "relative"}))
    sample = TrainingFolder(root, "depth", 4, encode_target=train_depth.encode_depth_target)[0]
    assert sample["valid"][0].tolist() == [[False, True, True, True]] * 4

    (root / "d3_dataset.json").write_text(json.dumps({"depth_kind": "inverse_depth"}))
    with pytest.raises(ValueError, match=rf"{root / 'd3_dataset.json'}: depth_kind 'inverse_depth' is not one of "
                                         r"\('metric', 'relative', 'relative_inverse'\)"):
        TrainingFolder(root, "depth", 4, encode_target=train_depth.encode_depth_target)
