"""d3.pseudo_label end to end with tiny randomly initialised transformers depth models built from configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3.io import load_rgb
from d3.prepare import list_samples, read_manifest
from d3.pseudo_label import main, predict

transformers = pytest.importorskip("transformers")

# stored (height, width); b/rot.jpg carries an EXIF 90-degree rotation, so it decodes as 22 x 18
SIZES = {"a/x.jpg": (20, 30), "a/y.png": (25, 17), "b/rot.jpg": (18, 22), "c/w.bmp": (16, 16), "top.jpeg": (21, 19)}
# where each lands: plain JPEG/PNG copied, the RGBA PNG, the rotated JPEG and the BMP written as decoded PNGs
OUTPUTS = {"a/x.jpg": "a/x.jpg", "a/y.png": "a/y.png", "b/rot.jpg": "b/rot.png", "c/w.bmp": "c/w.png",
           "top.jpeg": "top.jpeg"}


def load_depth(root: Path, rel: str) -> np.ndarray:
    return np.load(root / "depth" / f"{rel}.npy")


def _save_tiny_depth_anything(folder: Path, metric: bool) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(0)
    backbone = dict(model_type="dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=32, patch_size=4, image_size=32, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=False)
    extra = dict(depth_estimation_type="metric", max_depth=20) if metric else {}
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=4, reassemble_hidden_size=16,
                                 neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8, **extra)
    model = DepthAnythingForDepthEstimation(config).eval()
    # keep_aspect_ratio: inputs of different shapes in one batch (the labeller groups them)
    processor = DPTImageProcessorPil(size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=4)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"relative": _save_tiny_depth_anything(root / "rel", metric=False),
            "metric": _save_tiny_depth_anything(root / "metric", metric=True)}


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for rel, (h, w) in SIZES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        if rel == "b/rot.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90": must not survive, the label is for the stored pixel grid
            im.save(path, exif=exif.tobytes(), quality=95)
        elif rel == "a/y.png":  # half transparent: decoded on white
            alpha = np.where(np.arange(w)[None, :] < w // 2, 255, 60).astype(np.uint8).repeat(h, axis=0)
            Image.fromarray(np.dstack([np.asarray(im), alpha]), "RGBA").save(path)
        else:
            im.save(path)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def _direct(model_dir: Path, path: Path) -> np.ndarray:
    """The same model run on one image without the CLI: what the batched labeller must reproduce."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForDepthEstimation.from_pretrained(model_dir).eval()
    rgb = load_rgb(path)
    with torch.no_grad():
        out = model(**processor(images=rgb, return_tensors="pt"))
    return processor.post_process_depth_estimation(out, target_sizes=[rgb.shape[:2]])[0]["predicted_depth"].numpy()


@pytest.mark.quick
def test_pseudo_label_end_to_end_relative(models, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--input", str(images), "--output", str(out), "--model", str(models["relative"]),
            "--batch_size", "3", "--num_workers", "0", "--device", "cpu"]
    assert main(argv) == 1  # the broken file is reported, the others are labelled
    report = capsys.readouterr().out
    assert f"FAILED {images / 'a' / 'broken.jpg'}" in report
    assert "5 written, 0 skipped (already done), 1 failed; 5 samples" in report

    manifest = read_manifest(out)
    assert manifest["depth_kind"] == "relative_inverse" and manifest["source"] == "coco"
    assert manifest["model"] == str(models["relative"].resolve()) and manifest["modalities"] == ["depth"]
    assert "max_depth" not in manifest
    rels = {r[: r.rindex(".")] for r in SIZES}
    assert set(list_samples(out)) == rels
    for rel, out_rel in OUTPUTS.items():
        stem = rel[: rel.rindex(".")]
        decoded = load_rgb(images / rel)  # what training and inference see
        depth = load_depth(out, stem)
        assert depth.shape == decoded.shape[:2] and depth.dtype == np.float32 and np.isfinite(depth).all()
        np.testing.assert_allclose(depth, _direct(models["relative"], images / rel), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(load_rgb(out / "rgb" / out_rel), decoded)
    assert load_depth(out, "b/rot").shape == (22, 18)
    # plain JPEG/PNG copied byte for byte; the others written as their decoded pixels, without EXIF
    for rel in ["a/x.jpg", "top.jpeg"]:
        assert (out / "rgb" / rel).read_bytes() == (images / rel).read_bytes()
    with Image.open(out / "rgb" / "b" / "rot.png") as im:
        assert im.size == (18, 22) and im.getexif().get(0x0112) is None and im.mode == "RGB"
    with Image.open(out / "rgb" / "a" / "y.png") as im:
        assert im.mode == "RGB"  # the RGBA input, composited on white as d3.io decodes it
    assert not list(out.rglob("*.tmp"))

    # the training reader turns the stored disparity into depth: 1/label where > 0, invalid elsewhere (16x16: no
    # resize at resolution 16, so pixels correspond)
    from d3.data.folders import TrainingFolder
    from train_depth import encode_depth_target

    ds = TrainingFolder(out, "depth", 16, encode_target=encode_depth_target)
    sample = ds[[p.stem for p, _, _ in ds.items].index("w")]
    label = load_depth(out, "c/w").astype(np.float64)
    assert (label > 0).any() and (label <= 0).any()  # this tiny random model predicts both
    np.testing.assert_array_equal(sample["valid"][0].numpy(), label > 0)
    np.testing.assert_allclose((sample["gt"] * sample["valid"])[0].numpy(),
                               np.where(label > 0, 1 / np.where(label > 0, label, 1), 0),
                               rtol=1e-6)

    # resumable: a second run labels nothing new
    assert main(argv) == 1
    assert "0 written, 5 skipped (already done), 1 failed" in capsys.readouterr().out
    (out / "rgb" / "a" / "x.jpg").unlink()  # an interrupted sample (depth written, rgb not) is redone
    assert main(argv) == 1
    assert "1 written, 4 skipped" in capsys.readouterr().out

    # one folder, one model
    with pytest.raises(SystemExit, match="settings"):
        main(argv[:-6] + ["--model", str(models["metric"]), "--num_workers", "0", "--device", "cpu"])


def test_pseudo_label_metric_model(models, images, tmp_path, capsys):
    out = tmp_path / "out"
    (images / "a" / "broken.jpg").unlink()
    assert main(["--input", str(images), "--output", str(out), "--model", str(models["metric"]),
                 "--batch_size", "2", "--num_workers", "2", "--source", "real"]) == 0  # DataLoader workers
    manifest = read_manifest(out)
    assert (manifest["depth_kind"], manifest["min_depth"], manifest["max_depth"]) == ("metric", 1e-5, 80.0)
    assert manifest["source"] == "real" and manifest["num_samples"] == len(SIZES)
    for rel in SIZES:
        depth = load_depth(out, rel[: rel.rindex(".")])
        assert np.isfinite(depth).all() and depth.min() >= -1e-3 and depth.max() <= 20.0 + 1e-3
        np.testing.assert_allclose(depth, _direct(models["metric"], images / rel), rtol=1e-4, atol=1e-5)


def test_unreachable_model_fails_in_one_line(tmp_path, images, monkeypatch):
    import huggingface_hub

    import d3.pseudo_label as pl

    out = tmp_path / "out"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert pl.hub_reachable() is False
    monkeypatch.setattr(pl, "hub_reachable", lambda timeout=5.0: False)  # no network, whatever the machine
    for model in ["d3-tests/no-such-depth-model", str(tmp_path / "no" / "model")]:
        with pytest.raises(SystemExit) as err:
            main(["--input", str(images), "--output", str(out), "--model", model])
        message = str(err.value)
        assert "\n" not in message and model in message and "--model" in message
    assert "local folder" in message or "no such model folder" in message
    assert not out.exists()


def test_depth_pro_is_metric(tmp_path, images):
    """The default model family (its image processor needs torchvision)."""
    pytest.importorskip("torchvision")
    from transformers import DepthProConfig, DepthProForDepthEstimation, DepthProImageProcessor

    vit = dict(model_type="dinov2", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, patch_size=4, image_size=16)
    config = DepthProConfig(fusion_hidden_size=16, patch_size=16, intermediate_hook_ids=[1, 0],
                            intermediate_feature_dims=[8, 8], scaled_images_ratios=[0.5, 1.0],
                            scaled_images_overlap_ratios=[0.0, 0.5], scaled_images_feature_dims=[16, 16],
                            use_fov_model=True, image_model_config=vit, patch_model_config=vit, fov_model_config=vit)
    folder = tmp_path / "depth_pro"
    DepthProForDepthEstimation(config).save_pretrained(folder)
    DepthProImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    (images / "a" / "broken.jpg").unlink()
    out = tmp_path / "out"
    assert main(["--input", str(images), "--output", str(out), "--model", str(folder), "--num_workers", "0"]) == 0
    assert read_manifest(out)["depth_kind"] == "metric"
    for rel in SIZES:
        depth = load_depth(out, rel[: rel.rindex(".")])
        assert depth.shape == load_rgb(images / rel).shape[:2] and np.isfinite(depth).all() and depth.min() > 0


def test_predict_groups_shapes_in_a_batch(models):
    """Items of two input shapes in one batch come back in order, each at its own size."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(models["relative"])
    model = AutoModelForDepthEstimation.from_pretrained(models["relative"]).eval()
    rng = np.random.default_rng(1)
    items = []
    for h, w in [(20, 40), (30, 15), (21, 41)]:
        im = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        items.append({"size": (h, w), "pixel_values": processor(images=im, return_tensors="pt")["pixel_values"][0]})
    assert len({tuple(i["pixel_values"].shape) for i in items}) == 2
    depths = predict(model, processor, items, torch.device("cpu"), torch.float32)
    assert [d.shape for d in depths] == [(20, 40), (30, 15), (21, 41)]
