"""Training data: plain folders in every depth encoding, the authors' released format, mixing, target encoding."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_depth
import train_matting
import train_normal
from d3.data.folders import BadSampleError, TrainingFolder, open_sources
from d3.data.mixing import mixing_probabilities, parse_dataset_spec

pytestmark = pytest.mark.quick


def _write_rgb(path, h=12, w=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_plain_folder_reads_npy_png_and_h5_depth(tmp_path):
    depth = np.linspace(1, 5, 12 * 16, dtype=np.float32).reshape(12, 16)
    depth[0, 0] = 0  # invalid
    _write_rgb(tmp_path / "rgb" / "a.png")
    np.save(tmp_path / "depth" / "a.npy", depth) if (tmp_path / "depth").mkdir() is None else None
    _write_rgb(tmp_path / "rgb" / "sub" / "b.jpg", seed=1)
    (tmp_path / "depth" / "sub").mkdir()
    Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(tmp_path / "depth" / "sub" / "b.png")
    _write_rgb(tmp_path / "rgb" / "c.png", seed=2)
    with h5py.File(tmp_path / "depth" / "c.h5", "w") as f:
        f["depth"] = depth
    (tmp_path / "d3_dataset.json").write_text(json.dumps({"source": "hypersim", "max_depth": 4.0}))

    ds = TrainingFolder(tmp_path, "depth", 16, encode_target=train_depth.encode_depth_target)
    assert len(ds) == 3 and ds.name == "hypersim"
    for sample in (ds[0], ds[1], ds[2]):
        assert sample["rgb"].shape == (3, 16, 16) and -1 <= sample["rgb"].min() and sample["rgb"].max() <= 1
        assert sample["target"].shape == (3, 16, 16)
        assert sample["gt"].shape == sample["valid"].shape == (1, 12, 16)  # ground truth at its native size
        valid = sample["valid"][0]
        assert not valid[0, 0]  # depth 0 is invalid
        assert float(sample["gt"][0][valid].max()) < 4.0  # max_depth from d3_dataset.json
        # uint16 PNG millimetres, .npy and .h5 metres all decode to the same metres
        torch.testing.assert_close(sample["gt"], ds[0]["gt"], atol=1e-3, rtol=0)
    square = TrainingFolder(tmp_path, "depth", 16, encode_target=train_depth.encode_depth_target,
                            loss_resolution="train")[0]
    assert square["gt"].shape == square["valid"].shape == (1, 16, 16) and not square["valid"][0, 0, 0]


def test_bad_samples_name_their_file(tmp_path):
    _write_rgb(tmp_path / "rgb" / "a.png")
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "a.npy", np.full((12, 16), np.nan, np.float32))
    _write_rgb(tmp_path / "rgb" / "b.png")  # no depth file at all
    _write_rgb(tmp_path / "rgb" / "c.png")
    np.save(tmp_path / "depth" / "c.npy", np.zeros((12, 16), np.float32))  # no valid pixel
    ds = TrainingFolder(tmp_path, "depth", 8, encode_target=train_depth.encode_depth_target)
    for i, (name, reason) in enumerate([("a.npy", "NaN"), ("b.", "missing"), ("c.npy", "no valid pixel")]):
        with pytest.raises(BadSampleError, match=reason) as err:
            ds[i]
        assert name in str(err.value)


def test_authors_depth_format_is_split_by_source(tmp_path):
    for stem, ext in [("ai_001_001_cam_00_fr0000", ".png"), ("Scene01_x", ".jpg"), ("coco_000001", ".jpg")]:
        _write_rgb(tmp_path / "rgb" / f"{stem}{ext}")
        for sub, data in [("depth", np.full((12, 16, 3), 0.5, np.float32)),
                          ("depth_ori", np.full((12, 16), 70.0, np.float32))]:
            (tmp_path / sub).mkdir(exist_ok=True)
            with h5py.File(tmp_path / sub / f"{stem}.h5", "w") as f:
                f["depth"] = data
        (tmp_path / f"{stem}.json").write_text('{"caption": "x"}')
    sources = {s.name: s for s in open_sources(tmp_path, "depth", 8)}
    assert set(sources) == {"hypersim", "vkitti", "coco"}
    sample = sources["vkitti"][0]
    torch.testing.assert_close(sample["target"], torch.zeros(3, 8, 8))  # stored 0.5 in [0, 1] -> 0 in [-1, 1]
    torch.testing.assert_close(sample["gt"], torch.full((1, 12, 16), 70.0))  # native metric depth from depth_ori/
    assert sample["valid"].all()
    # 70 m is inside vKITTI's and COCO's 80 m range but beyond Hypersim's 65 m, as in the official loader
    assert sources["coco"][0]["valid"].all()
    with pytest.raises(BadSampleError, match="no valid pixel"):
        sources["hypersim"][0]


def test_depth_target_encoding_uses_2_98_quantiles_and_far_for_invalid():
    depth = torch.arange(1, 101, dtype=torch.float32).view(1, 10, 10)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[0, 0, 0] = False
    target = train_depth.encode_depth_target({"depth": depth, "valid": valid})
    assert target.shape == (3, 10, 10)
    lo, hi = torch.quantile(depth[valid], torch.tensor([0.02, 0.98]))
    torch.testing.assert_close(target[0, 5, 5], (depth[0, 5, 5] - lo) / (hi - lo) * 2 - 1)
    assert float(target[0, 0, 0]) == 1.0  # invalid -> far plane
    assert float(target.min()) == -1.0 and float(target.max()) == 1.0  # clipped beyond the quantiles


def test_recipes_encode_alpha_and_normal_targets_and_a_raw_folder_needs_an_encoder(tmp_path):
    """Each recipe owns its target encoding; the reader resizes mattes before it (8 bits, PIL bilinear) and normal
    targets after it (bilinear, no antialias). Expected values are computed here from the raw files alone."""
    assert train_matting.RECIPE.encode_target is train_matting.encode_alpha_target
    assert train_normal.RECIPE.encode_target is train_normal.encode_normal_target
    rng = np.random.default_rng(3)
    mattes = tmp_path / "mattes"
    _write_rgb(mattes / "images" / "p.jpg")
    (mattes / "masks").mkdir()
    Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8)).save(mattes / "masks" / "p.png")
    normals = tmp_path / "normals"
    _write_rgb(normals / "rgb" / "n.png")
    (normals / "normal").mkdir()
    normal = rng.normal(size=(20, 28, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[:3, :5] = 0  # invalid
    np.save(normals / "normal" / "n.npy", normal)

    [alpha_source] = open_sources(mattes, "alpha", 16, train_matting.RECIPE.encode_target)
    with Image.open(mattes / "masks" / "p.png") as matte:
        resized = matte.resize((16, 16), Image.BILINEAR)
    alpha = torch.from_numpy(np.asarray(resized, dtype=np.float32) / np.float32(255))
    assert torch.equal(alpha_source[0]["target"], (alpha * 2 - 1).expand(3, -1, -1))
    [normal_source] = open_sources(normals, "normal", 16, train_normal.RECIPE.encode_target)
    sample = normal_source[0]
    expected = F.interpolate(torch.from_numpy(normal).permute(2, 0, 1)[None], size=(16, 16), mode="bilinear",
                             align_corners=False)[0]  # not renormalised
    assert torch.equal(sample["target"], expected)
    assert torch.equal(sample["gt"], torch.from_numpy(normal).permute(2, 0, 1))  # native normals, as stored

    for root, modality in ((mattes, "alpha"), (normals, "normal")):
        with pytest.raises(ValueError, match=rf"{re.escape(str(root))}: '{modality}' ground truth needs the task "
                                             r"recipe's target encoding \(encode_target"):
            TrainingFolder(root, modality, 16)


def test_mixing_defaults_renormalise_over_the_given_sources():
    defaults = train_depth.MIXING
    assert mixing_probabilities(["hypersim", "vkitti", "coco"], [None] * 3, defaults) == pytest.approx([.76, .12, .12])
    assert mixing_probabilities(["hypersim", "coco"], [None, None], defaults) == pytest.approx([.76 / .88, .12 / .88])
    assert mixing_probabilities(["hypersim", "coco"], [None, 0.76], defaults) == pytest.approx([0.5, 0.5])
    assert parse_dataset_spec("/data/hypersim:0.5") == ("/data/hypersim", 0.5)
    assert parse_dataset_spec("/data/hypersim") == ("/data/hypersim", None)


def test_source_without_a_d3_dataset_json_is_guessed_from_the_folder_and_its_parent(tmp_path):
    from d3.data.folders import DatasetMeta

    cases = {"P3M-10k/train": "p3m", "data/hypersim": "hypersim", "vkitti2/train": "vkitti", "photos/train": "real"}
    for rel, source in cases.items():
        (tmp_path / rel).mkdir(parents=True)
        meta = DatasetMeta.read(tmp_path / rel)
        assert meta.source == source, rel
    (tmp_path / "data/hypersim/d3_dataset.json").write_text('{"source": "coco"}')  # the file has the last word
    assert DatasetMeta.read(tmp_path / "data/hypersim").source == "coco"
