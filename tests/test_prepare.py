"""d3.prepare: raw-layout fixtures convert to the expected values, resumably, in the plain folder format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_matting
import train_normal
from d3.data.folders import DatasetMeta, TrainingFolder, read_array
from d3.prepare import list_samples, read_manifest
from d3.prepare.__main__ import main
from d3.io import atomic_write, save_png
from d3.prepare.common import DONE_DIR
from d3.prepare.hypersim import tone_map
from tests import raw_fixtures as fx

pytestmark = pytest.mark.quick


def _find(root: Path, kind: str, rel: str) -> Path:
    (path,) = [p for p in (root / kind).glob(f"{rel}.*") if not p.name.startswith(".")]
    return path


def load_depth(root: Path, rel: str) -> np.ndarray:
    """Metres, through the training reader's own decoding (npy, or uint16 PNG x depth_png_scale)."""
    path = _find(root, "depth", rel)
    return read_array(path, png_scale=DatasetMeta.read(root).depth_png_scale if path.suffix == ".png" else 1.0)


def load_normal(root: Path, rel: str) -> np.ndarray:
    return np.load(_find(root, "normal", rel))


def load_rgb(root: Path, rel: str) -> np.ndarray:
    with Image.open(_find(root, "rgb", rel)) as im:
        return np.asarray(im.convert("RGB"))


def load_alpha(root: Path, rel: str) -> np.ndarray:
    with Image.open(_find(root, "alpha", rel)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _no_temp_files(root: Path) -> None:
    assert not [p for p in root.rglob("*.tmp")], "a temporary file was left behind"


# --------------------------------------------------------------------------------------------
# Hypersim


@pytest.fixture(scope="module")
def hypersim(tmp_path_factory):
    raw = tmp_path_factory.mktemp("hypersim_raw")
    return raw, fx.write_hypersim(raw)


def test_tone_map_90th_percentile_rule():
    # 11 valid grey pixels 1..11: the 90th percentile is exactly 10 -> 0.8 after the gamma
    grey = np.arange(1.0, 13.0)
    grey[-1] = 1e6  # invalid, must not count
    rgb = np.repeat(grey[None, :, None], 3, axis=-1)
    valid = np.ones((1, 12), bool)
    valid[0, -1] = False
    out = tone_map(rgb, valid)[0, :, 0]
    assert out[9] == pytest.approx(0.8)
    assert out[0] == pytest.approx(0.8 * (1 / 10) ** (1 / 2.2))
    assert out[10] == pytest.approx(0.8 * 1.1 ** (1 / 2.2)) and out[-1] == 1.0  # the invalid pixel is clipped
    # brightness is CCIR601 (0.3 R + 0.59 G + 0.11 B): coloured pixels with the same brightnesses
    w = np.array([0.5, 1.2, 1.0])
    rgb2 = grey[None, :, None] * w / np.dot([0.3, 0.59, 0.11], w)
    np.testing.assert_allclose(tone_map(rgb2, valid)[0, 9], 0.8 * (w / np.dot([0.3, 0.59, 0.11], w)) ** (1 / 2.2))
    assert np.all(tone_map(rgb, np.zeros_like(valid)) == np.clip(rgb ** (1 / 2.2), 0, 1))  # no valid pixel: scale 1


def test_hypersim_converts_to_expected_values(hypersim, tmp_path, capsys):
    raw, expected = hypersim
    out = tmp_path / "out"
    assert main(["hypersim", "--src", str(raw), "--dst", str(out)]) == 0
    report = capsys.readouterr().out
    assert "2 written, 0 skipped (already done), 0 failed; 2 samples" in report
    assert "ai_009_009" in report  # listed in the CSV but absent under --src

    manifest = read_manifest(out)
    assert manifest["source"] == "hypersim" and manifest["format"] == "d3-plain"
    assert (manifest["min_depth"], manifest["max_depth"], manifest["depth_kind"]) == (1e-5, 65.0, "metric")
    assert manifest["modalities"] == ["depth", "normal"] and manifest["num_samples"] == 2
    # only public, non-excluded train rows
    assert list_samples(out) == ["ai_001_001/cam_00_fr0000", "ai_001_001/cam_00_fr0001"]

    for rel in list_samples(out):
        exp = expected[rel]
        valid = exp["valid"]
        # planar depth from the distance field (float16 distances: ~5e-4 relative)
        depth = load_depth(out, rel)
        assert depth.dtype == np.float32 and depth.shape == (fx.HYP_H, fx.HYP_W)
        np.testing.assert_allclose(depth[valid & (depth > 0)], exp["depth"][valid & (depth > 0)], rtol=1e-3)
        assert np.all(depth[~valid] == 0)
        assert np.count_nonzero(depth == 0) == np.count_nonzero(~valid)  # the NaN distance sits on an invalid pixel
        # normals: unit, camera-facing (back-facing ones flipped along the true pixel ray), invalid -> 0
        normal = load_normal(out, rel)
        good = np.linalg.norm(exp["normal"], axis=-1) > 0
        np.testing.assert_allclose(np.linalg.norm(normal[good], axis=-1), 1.0, atol=1e-5)
        cos = np.sum(normal[good] * exp["normal"][good], axis=-1)
        assert np.degrees(np.arccos(np.clip(cos.min(), -1, 1))) < 0.5
        assert np.all(normal[~good] == 0) and np.all(normal[5, 5] == 0)
        assert exp["flipped"].sum() > 10
        for r, c, stored_dir in fx.TRICKY_NORMALS:
            t = np.asarray(stored_dir) / np.linalg.norm(stored_dir)
            np.testing.assert_allclose(normal[r, c], -t, atol=2e-3)
        # tone-mapped RGB: the 90th-percentile brightness of valid pixels -> 0.8 after gamma 1/2.2
        grey = exp["color"][..., 0].astype(np.float64)
        p90 = np.percentile(grey[valid], 90)
        want = np.floor(255 * np.clip(0.8 * (grey / p90) ** (1 / 2.2), 0, 1))
        rgb = load_rgb(out, rel)
        assert rgb.shape == (fx.HYP_H, fx.HYP_W, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        assert np.abs(rgb[..., 1].astype(int) - want).max() <= 1
        assert (rgb[~valid] == 255).all()
    _no_temp_files(out)


def test_hypersim_resumes_and_selects_splits(hypersim, tmp_path, capsys):
    raw, expected = hypersim
    out = tmp_path / "out"
    args = ["hypersim", "--src", str(raw), "--dst", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in (out / DONE_DIR).iterdir()) == ["ai_001_001.json"]
    capsys.readouterr()
    assert main(args) == 0  # finished scene: skipped from its marker
    assert "0 written, 2 skipped" in capsys.readouterr().out

    # a lost file in a scene without its marker: only that sample is redone
    for marker in (out / DONE_DIR).iterdir():
        marker.unlink()
    (out / "normal" / "ai_001_001" / "cam_00_fr0001.npy").unlink()
    assert main(args) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert load_normal(out, "ai_001_001/cam_00_fr0001").shape == (fx.HYP_H, fx.HYP_W, 3)

    # one folder never mixes encodings
    with pytest.raises(SystemExit, match="settings"):
        main(args + ["--depth_format", "png"])

    # all splits, uint16 millimetre depth, no normals, two worker processes
    out2 = tmp_path / "all"
    assert main(["hypersim", "--src", str(raw), "--dst", str(out2), "--split", "all", "--depth_format", "png",
                 "--no_normals", "--workers", "2"]) == 0
    rels = list_samples(out2)
    assert rels == sorted(r for r, e in expected.items() if e["listed"])
    assert len(rels) == 3 and not (out2 / "normal").exists()
    manifest = read_manifest(out2)
    assert manifest["depth_png_scale"] == 0.001 and manifest["modalities"] == ["depth"]
    for rel in rels:
        with Image.open(out2 / "depth" / f"{rel}.png") as im:
            assert np.asarray(im).dtype == np.uint16
        depth = load_depth(out2, rel)
        valid = expected[rel]["valid"]
        assert np.abs(depth[valid] - expected[rel]["depth"][valid]).max() < 2e-3 + 1e-3 * expected[rel]["depth"].max()
        assert np.all(depth[~valid] == 0)
    _no_temp_files(out2)


# --------------------------------------------------------------------------------------------
# Virtual KITTI 2


def test_vkitti_depth_units_cap_and_selection(tmp_path, capsys):
    raw, out = tmp_path / "vkitti", tmp_path / "out"
    expected = fx.write_vkitti(raw)
    args = ["vkitti", "--src", str(raw), "--dst", str(out)]
    assert main(args) == 1  # one frame has no depth file
    report = capsys.readouterr().out
    assert "3 written, 0 skipped (already done), 1 failed" in report
    assert "FAILED Scene02/clone/Camera_1/00000: missing file" in report and "depth_00000.png" in report
    assert list_samples(out) == sorted(expected)  # Scene01 (val) and fog are not in Marigold's train set
    manifest = read_manifest(out)
    assert (manifest["source"], manifest["max_depth"], manifest["depth_kind"]) == ("vkitti", 80.0, "metric")

    for rel, rawd in expected.items():
        depth = load_depth(out, rel)
        assert depth.shape == (fx.VK_H, fx.VK_W)
        for r, c, _, metres in fx.VK_SPECIAL:
            assert depth[r, c] == pytest.approx(metres, abs=1e-5)
        ordinary = rawd < 7000
        np.testing.assert_allclose(depth[ordinary], rawd[ordinary] / 100.0, rtol=1e-6)
        assert np.all(depth[:40] == 0)  # sky (65535) is invalid
        scene, var, cam, frame = rel.split("/")
        src_jpg = raw / "rgb" / scene / var / "frames" / "rgb" / cam / f"rgb_{frame}.jpg"
        assert (out / "rgb" / f"{rel}.jpg").read_bytes() == src_jpg.read_bytes()

    assert main(args) == 1
    assert "0 written, 3 skipped (already done), 1 failed" in capsys.readouterr().out

    # KITTI benchmark crop, centimetre PNG
    out2 = tmp_path / "kb"
    assert main(["vkitti", "--src", str(raw), "--dst", str(out2), "--kb_crop", "--depth_format", "png",
                 "--scenes", "Scene01", "--variations", "clone", "--cameras", "Camera_0"]) == 0
    (rel,) = list_samples(out2)
    assert rel == "Scene01/clone/Camera_0/00000"
    depth, rgb = load_depth(out2, rel), load_rgb(out2, rel)
    assert depth.shape == (352, 1216) and rgb.shape == (352, 1216, 3)
    top, left = fx.VK_H - 352, (fx.VK_W - 1216) // 2
    assert depth[300 - top, 600 - left] == pytest.approx(23.45)
    with Image.open(raw / "rgb" / "Scene01" / "clone" / "frames" / "rgb" / "Camera_0" / "rgb_00000.jpg") as im:
        np.testing.assert_array_equal(rgb, np.asarray(im.convert("RGB"))[top:, left : left + 1216])
    assert read_manifest(out2)["depth_png_scale"] == 0.01


# --------------------------------------------------------------------------------------------
# Sintel


def test_sintel_sky_and_crop(tmp_path, capsys):
    raw = tmp_path / "sintel"
    expected = fx.write_sintel(raw)
    out = tmp_path / "out"
    assert main(["sintel", "--src", str(raw), "--dst", str(out)]) == 0
    assert list_samples(out) == sorted(expected)
    assert read_manifest(out)["settings"] == {"crop": 221}
    for rel, exp in expected.items():
        normal, rgb = load_normal(out, rel), load_rgb(out, rel)
        assert normal.shape == (fx.SIN_H, fx.SIN_W - 442, 3) and rgb.shape == (fx.SIN_H, fx.SIN_W - 442, 3)
        want = exp["normal"].copy()
        want[exp["sky"]] = (0, 0, 1)
        np.testing.assert_array_equal(normal, want[:, 221:-221])
        np.testing.assert_array_equal(normal[0], np.tile([0.0, 0.0, 1.0], (fx.SIN_W - 442, 1)))
        assert np.all(normal[1, 225 - 221] == (0, 0, 1))
        np.testing.assert_array_equal(rgb, exp["rgb"][:, 221:-221])

    # a Marigold file list, no crop: the PNG is copied as is
    out2 = tmp_path / "list"
    assert main(["sintel", "--src", str(raw), "--dst", str(out2), "--no-crop",
                 "--list", str(raw / "sintel_filtered.txt")]) == 0
    assert list_samples(out2) == ["alley_2/frame_0001", "market_5/frame_0010"]
    assert load_normal(out2, "alley_2/frame_0001").shape == (fx.SIN_H, fx.SIN_W, 3)
    assert (out2 / "rgb" / "alley_2" / "frame_0001.png").read_bytes() == \
        (raw / "alley_2" / "frame_0001_img.png").read_bytes()


# --------------------------------------------------------------------------------------------
# P3M-10k


@pytest.mark.parametrize("level", ["root", "P3M-10k", "train"])
def test_p3m_alpha_round_trip(tmp_path, capsys, level):
    raw = tmp_path / "raw"
    expected = fx.write_p3m(raw)
    src = {"root": raw, "P3M-10k": raw / "P3M-10k", "train": raw / "P3M-10k" / "train"}[level]
    out = tmp_path / "out"
    assert main(["p3m", "--src", str(src), "--dst", str(out)]) == 1
    assert "FAILED p_nomask: missing file" in capsys.readouterr().out
    assert list_samples(out) == sorted(expected)
    manifest = read_manifest(out)
    assert manifest["source"] == "p3m" and manifest["modalities"] == ["alpha"]
    for stem, alpha in expected.items():
        np.testing.assert_array_equal(load_alpha(out, stem), alpha)
        train = raw / "P3M-10k" / "train"
        assert (out / "rgb" / f"{stem}.jpg").read_bytes() == (train / "blurred_image" / f"{stem}.jpg").read_bytes()


# --------------------------------------------------------------------------------------------
# The training reader reads what the converters write


def test_training_reader_reads_prepared_folders(hypersim, tmp_path):
    raw, _ = hypersim
    out = tmp_path / "hypersim"
    assert main(["hypersim", "--src", str(raw), "--dst", str(out), "--depth_format", "png"]) == 0
    depth = TrainingFolder(out, "depth", 16, encode_target=lambda s: s["depth"].expand(3, -1, -1))
    assert (depth.name, depth.meta.min_depth, depth.meta.max_depth, len(depth)) == ("hypersim", 1e-5, 65.0, 2)
    sample = depth[0]
    assert sample["valid"].sum() < sample["valid"].numel() and (sample["gt"][sample["valid"]] > 0.9).all()
    normals = TrainingFolder(out, "normal", 16, encode_target=train_normal.encode_normal_target)
    gt, valid = normals[1]["gt"], normals[1]["valid"][0]  # native-size normals and mask
    assert normals[1]["target"].shape == (3, 16, 16)
    assert torch.allclose(gt[:, valid].norm(dim=0), torch.ones(()), atol=1e-5) and not valid.all()

    p3m_raw = tmp_path / "p3m_raw"
    fx.write_p3m(p3m_raw)
    main(["p3m", "--src", str(p3m_raw), "--dst", str(tmp_path / "p3m")])
    mattes = TrainingFolder(tmp_path / "p3m", "alpha", 16, encode_target=train_matting.encode_alpha_target)
    assert len(mattes) == 2


# --------------------------------------------------------------------------------------------
# The writer


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "x.npy"

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list((tmp_path / "a").iterdir()) == []
    with pytest.raises(ValueError, match="x.png: cannot save float64"):  # a target in the wrong dtype is no PNG
        save_png(tmp_path / "a" / "x.png", np.zeros((4, 4)))
    assert list((tmp_path / "a").iterdir()) == []


def test_source_mismatch_is_refused(tmp_path):
    raw = tmp_path / "raw"
    fx.write_p3m(raw)
    out = tmp_path / "out"
    out.mkdir()
    (out / "d3_dataset.json").write_text(json.dumps({"source": "vkitti", "settings": {}}))
    with pytest.raises(SystemExit, match="vkitti"):
        main(["p3m", "--src", str(raw), "--dst", str(out)])
