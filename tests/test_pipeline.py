"""D3Pipeline: the same bytes as infer.py for the same checkpoint and image, Marigold-style outputs, a hub-ready
save_pretrained that round-trips, and clear errors on inputs it cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3.pipeline import D3Pipeline
from d3.checkpoint import CheckpointError
from d3.predictor import D3Predictor

CHECKPOINTS = {"depth": "tiny_depth_checkpoint", "normal": "tiny_normal_checkpoint",
               "matting": "tiny_matting_checkpoint"}


def write_images(folder: Path) -> dict[str, np.ndarray]:
    """Odd sizes, a JPEG and an RGBA PNG (composited on white by both readers)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {"a.png": rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
              "b.jpg": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
              "c.png": rng.integers(0, 256, (33, 40, 4), dtype=np.uint8)}
    for name, arr in arrays.items():
        Image.fromarray(arr).save(folder / name, quality=90)
    return arrays


@pytest.fixture(scope="module")
def depth_pipe(tiny_depth_checkpoint) -> D3Pipeline:
    return D3Pipeline.from_pretrained(tiny_depth_checkpoint)


@pytest.mark.parametrize("task", list(CHECKPOINTS))
def test_pipeline_and_infer_give_identical_outputs(task, request, tmp_path):
    import infer

    checkpoint = request.getfixturevalue(CHECKPOINTS[task])
    write_images(tmp_path / "in")
    assert infer.main(["--input", str(tmp_path / "in"), "--checkpoint", str(checkpoint), "--device", "cpu",
                       "--output", str(tmp_path / "out"), "--batch_size", "2"]) == 0
    pipe = D3Pipeline.from_pretrained(checkpoint)
    files = sorted((tmp_path / "in").iterdir())
    out = pipe([Image.open(f) for f in files], batch_size=2).prediction  # different sizes: a list
    assert isinstance(out, list) and len(out) == len(files)
    np.testing.assert_array_equal(pipe(files[2]).prediction[0], out[2])  # a path reads the same as the PIL image
    vis = pipe.image_processor
    for f, pred in zip(files, out):
        base = tmp_path / "out" / f.stem

        def written(suffix: str, base: Path = base) -> np.ndarray:
            return np.asarray(Image.open(f"{base}{suffix}"))

        assert pred.dtype == np.float32 and pred.shape[2] == (3 if task == "normal" else 1)
        if task == "depth":
            np.testing.assert_array_equal(pred[..., 0], np.load(f"{base}_depth.npy"))
            np.testing.assert_array_equal(np.asarray(vis.visualize_depth(pred)[0]), written("_depth_colored.png"))
            png16 = vis.export_depth_to_16bit_png(pred)[0]
            np.testing.assert_array_equal(np.asarray(png16), written("_depth_16bit.png"))
        elif task == "normal":
            np.testing.assert_array_equal(pred, np.load(f"{base}_normal.npy"))
            np.testing.assert_array_equal(np.asarray(vis.visualize_normals(pred)[0]), written("_normal.png"))
        else:
            np.testing.assert_array_equal(np.asarray(vis.visualize_alpha(pred)[0]), written("_alpha.png"))
            png16 = vis.export_alpha_to_16bit_png(pred)[0]
            np.testing.assert_array_equal(np.asarray(png16), written("_alpha_16bit.png"))
            np.testing.assert_array_equal(np.asarray(vis.cutout(Image.open(f), pred)[0]), written("_rgba.png"))


@pytest.mark.quick
def test_save_pretrained_writes_a_hub_ready_folder_that_round_trips(depth_pipe, tmp_path):
    import infer

    images = np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    before = depth_pipe(images).prediction
    assert before.shape == (2, 40, 56, 1)
    folder = tmp_path / "d3-depth-pipeline"
    depth_pipe.save_pretrained(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"model_index.json", "unet", "vae", "README.md", "d3_config.json", "prompt_embeds.safetensors"} <= names
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "D3Pipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert "text_encoder" not in index and index["task"] == "depth" and index["student_timestep"] == 261.0
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: depth-estimation\n")
    assert "D3Pipeline.from_pretrained" in card and "student timestep | 261" in card

    again = D3Pipeline.from_pretrained(folder)
    assert again.config["task"] == "depth" and again.d3_config == depth_pipe.d3_config
    np.testing.assert_array_equal(again(images).prediction, before)
    # The saved pipeline is also a d3 checkpoint folder: the predictor and infer.py read it as it is.
    assert D3Predictor.from_pretrained(folder, device="cpu").config == depth_pipe.d3_config
    Image.fromarray(images[0]).save(tmp_path / "x.png")
    assert infer.main(["--input", str(tmp_path / "x.png"), "--checkpoint", str(folder), "--device", "cpu",
                       "--output", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "x_depth.npy"), before[0, ..., 0])


@pytest.mark.quick
def test_every_input_form_gives_the_same_prediction(depth_pipe):
    rgb = np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    (ref,) = depth_pipe(rgb, return_dict=False)
    assert ref.shape == (1, 32, 48, 1) and ref.dtype == np.float32
    same_size = depth_pipe([Image.fromarray(rgb), rgb.astype(np.float32) / 255]).prediction  # stacked
    np.testing.assert_array_equal(same_size, np.concatenate([ref, ref]))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    pt = depth_pipe(tensor, output_type="pt").prediction
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 1, 32, 48)
    np.testing.assert_array_equal(pt[0].permute(1, 2, 0).numpy(), ref[0])
    gray = rgb[..., 0]
    np.testing.assert_array_equal(depth_pipe(gray).prediction, depth_pipe(np.repeat(gray[..., None], 3, 2)).prediction)
    squash = depth_pipe(rgb, resize_mode="squash", processing_res=64).prediction
    np.testing.assert_array_equal(squash[0, ..., 0], depth_pipe.predictor.predict([rgb], 64, resize_mode="squash")[0])


def test_bad_inputs_and_checkpoints_fail_clearly(depth_pipe, tiny_depth_checkpoint):
    with pytest.raises(ValueError, match=r"image\[1\]: a float image must lie in \[0, 1\]"):
        depth_pipe([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 2.0)])
    with pytest.raises(ValueError, match=r"image: expected an \(H, W\), \(H, W, 1\) or \(H, W, 3\) image"):
        depth_pipe(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(TypeError, match="image: expected a PIL image"):
        depth_pipe({"rgb": 1})
    with pytest.raises(ValueError, match="output_type"):
        depth_pipe(np.zeros((8, 8, 3), np.uint8), output_type="pil")
    with pytest.raises(CheckpointError, match="predicts 'depth', not 'normal'"):
        D3Pipeline.from_pretrained(tiny_depth_checkpoint, task="normal")
    with pytest.raises(CheckpointError, match="not downloadable from the Hugging Face Hub"):
        D3Pipeline.from_pretrained("nobody-here/no-such-d3-model")
