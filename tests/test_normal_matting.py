"""Normals and matting (train_normal.py, train_matting.py): the camera frame and its colours, the horizontal flip,
the training readers (plain folders, 16-bit PNG normals, the authors' .h5 format, P3M-10k, image/mask pairs) and the
default mixing, the task losses by hand, the efficient step against the official-style step, and infer.py's files."""

from __future__ import annotations

import json
import math
import struct
import zlib

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import infer
import train_matting
import train_normal
from d3.timesteps import stratified_timesteps
from d3.data.folders import BadSampleError, TrainingFolder, collate, open_sources
from d3.data.synthetic import Camera, Plane, Rect, SceneDescription, render, render_scene, rotation_matrix
from d3.losses import multiscale_gradient_loss, normal_losses
from d3.outputs import normal_to_rgb
from d3.objective import Objective, d3_step
from d3.training import build_parser
from d3.training_data import build_training_data, random_hflip
from d3.reference_step import build_parts, per_copy_step
from tests.helpers import grads, rel_err
from tests.test_equivalence import cast_batch

REL_TOL = 1e-5


# ------------------------------------------------------------------------------------------------------- helpers
def write_png16_rgb(path, values: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot), cycling through the five row filters (none, sub, up,
    average, Paeth) so that a reader must un-filter each of them correctly."""
    h, w, _ = values.shape
    rows = values.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).astype(np.int32).reshape(h, w * 6)
    bpp = 6
    out = []
    for i in range(h):
        x = rows[i]
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])  # left
        b = rows[i - 1] if i else np.zeros_like(x)  # up
        c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])  # up-left
        kind = i % 5
        if kind == 0:
            f = x
        elif kind == 1:
            f = x - a
        elif kind == 2:
            f = x - b
        elif kind == 3:
            f = x - (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            f = x - np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        out.append(bytes([kind]) + (f % 256).astype(np.uint8).tobytes())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(out)))
                     + chunk(b"IEND", b""))


def room_scene(mirror: bool = False) -> SceneDescription:
    """Level camera; a wall facing it 5 m ahead, a wall 2 m to its right (left if mirrored), the floor 1.5 m below,
    and a card left of centre (right if mirrored) tilted back by 30°: normal (0, sin 30°, cos 30°). Every normal is
    known in closed form."""
    s = -1.0 if mirror else 1.0
    return SceneDescription(
        Camera(64, 64, 32.0),
        [
            Plane((0.0, 0.0, -5.0), (0.0, 0.0, 1.0)),
            Plane((2.0 * s, 0.0, 0.0), (-1.0 * s, 0.0, 0.0)),
            Plane((0.0, -1.5, 0.0), (0.0, 1.0, 0.0)),
            Rect((-0.6 * s, 0.2, -3.0), (0.5, 0.5), rotation_matrix(pitch=-30.0)),
        ],
    )


# (row, col) -> the expected unit normal, for the unmirrored room
PROBES = {
    (20, 32): (0.0, 0.0, 1.0),  # back wall
    (32, 62): (-1.0, 0.0, 0.0),  # right wall: seen in the right of the image, faces left
    (62, 32): (0.0, 1.0, 0.0),  # floor: faces up
}


# ---------------------------------------------------------------------------------------------- frame and colour
@pytest.mark.quick
def test_known_planes_give_their_normal_their_colour_and_back():
    scene = render(room_scene(), supersample=1)
    for (row, col), expected in PROBES.items():
        np.testing.assert_allclose(scene.normal[row, col], expected, atol=1e-6)
    tilt = np.array([0.0, 0.5, math.sqrt(3) / 2], np.float32)
    hits = np.isclose(scene.normal, tilt, atol=1e-5).all(-1)
    assert hits.sum() > 50, "the tilted plane is visible"

    colours = normal_to_rgb(scene.normal)
    assert tuple(colours[20, 32]) == (128, 128, 255)  # the usual lavender of a camera-facing wall
    assert tuple(colours[32, 62]) == (0, 128, 128)
    assert tuple(colours[62, 32]) == (128, 255, 128)
    assert tuple(colours[hits][0]) == (128, 191, 238)  # (0, .5, .866) -> round((n+1)/2·255)
    back = colours.astype(np.float64) / 255 * 2 - 1
    np.testing.assert_allclose(back, scene.normal, atol=1 / 255 + 1e-6)  # (n+1)/2 colouring inverts to n


def test_opencv_frame_conversion_stated_in_the_readme():
    """OpenCV's camera frame (x right, y down, z forward) is ours with y and z negated."""
    scene = render(room_scene(), supersample=1)
    opencv = scene.normal * np.array([1, -1, -1], np.float32)
    np.testing.assert_allclose(opencv[62, 32], (0, -1, 0))  # the floor's normal points up = -y in OpenCV
    np.testing.assert_allclose(opencv[20, 32], (0, 0, -1))  # a facing wall points back at the camera = -z


def _plain_normal_folder(tmp_path, normals: dict[str, np.ndarray], rgb: np.ndarray) -> None:
    (tmp_path / "rgb").mkdir(parents=True)
    (tmp_path / "normal").mkdir()
    for name, normal in normals.items():
        Image.fromarray(rgb).save(tmp_path / "rgb" / f"{name}.png")
        np.save(tmp_path / "normal" / f"{name}.npy", normal)


def test_reader_target_is_the_unit_normal_and_a_flip_negates_x_like_the_mirrored_scene(tmp_path):
    scene = render(room_scene(), supersample=1)
    mirrored = render(room_scene(mirror=True), supersample=1)
    normal = scene.normal.copy()
    normal[:4, :10] = 0  # a missing patch
    _plain_normal_folder(tmp_path, {"a": normal}, scene.rgb)
    sample = TrainingFolder(tmp_path, "normal", 64, encode_target=train_normal.encode_normal_target)[0]
    target = sample["target"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(target, normal, atol=1e-6)
    assert not sample["valid"][0, :4, :10].any() and sample["valid"][0, 4:].all()

    batch = collate([sample])
    flipped = random_hflip(batch, torch.Generator().manual_seed(0), 1.0, train_normal.RECIPE.flip_target)
    torch.testing.assert_close(flipped["gt"][0], flipped["target"][0], atol=0, rtol=0)  # native normals flip alike
    flipped_target = flipped["target"][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(flipped_target[..., 0], -target[:, ::-1, 0], atol=0)  # x negated
    np.testing.assert_allclose(flipped_target[..., 1:], target[:, ::-1, 1:], atol=0)  # y, z kept
    # ... which is exactly the normal map of the mirrored room (outside the blanked patch)
    keep = flipped["valid"][0][0].numpy()
    np.testing.assert_allclose(flipped_target[keep], mirrored.normal[keep], atol=1e-5)
    assert torch.equal(flipped["valid"][0], batch["valid"][0].flip(-1))
    # matting targets are unchanged in value by a flip
    assert torch.equal(train_matting.RECIPE.flip_target(batch["target"]), batch["target"])


def test_plain_folder_reads_16bit_and_8bit_png_normals_with_black_as_invalid(tmp_path):
    scene = render_scene(3, 64, 64)
    normal = scene.normal.astype(np.float64)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "normal").mkdir()
    colours16 = np.round((normal + 1) / 2 * 65535).astype(np.uint16)
    colours16[:5, :7] = 0  # black = invalid
    write_png16_rgb(tmp_path / "normal" / "a.png", colours16)
    colours8 = normal_to_rgb(scene.normal)
    colours8[:5, :7] = 0
    Image.fromarray(colours8).save(tmp_path / "normal" / "b.png")
    for name in ("a", "b"):
        Image.fromarray(scene.rgb).save(tmp_path / "rgb" / f"{name}.png")
    ds = TrainingFolder(tmp_path, "normal", 64, encode_target=train_normal.encode_normal_target)
    for index, tol in ((0, 1e-4), (1, 1e-2)):
        sample = ds[index]
        valid = sample["valid"][0].numpy()
        assert not valid[:5, :7].any() and valid.sum() == 64 * 64 - 35
        target = sample["target"].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(target[valid], normal[valid], atol=tol)
        assert np.all(target[~valid] == 0)

    bad = tmp_path / "bad"
    (bad / "rgb").mkdir(parents=True)
    (bad / "normal").mkdir()
    Image.fromarray(scene.rgb).save(bad / "rgb" / "c.png")
    np.save(bad / "normal" / "c.npy", scene.depth)  # (H, W): not normals
    with pytest.raises(BadSampleError, match=r"c\.npy.*\(H, W, 3\)"):
        TrainingFolder(bad, "normal", 64, encode_target=train_normal.encode_normal_target)[0]


def _h5_normals(path, normal: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["depth"] = normal  # the authors' files keep normals under the key 'depth'


def test_authors_normal_format_splits_sintel_and_mixes_as_the_authors_code(tmp_path):
    root = tmp_path / "Hypersim_normal_30_k"
    (root / "rgb").mkdir(parents=True)
    (root / "normal").mkdir()
    scene = render_scene(5, 32, 32, invalid_fraction=0.1)
    for stem in ("ai_001_001_cam_00_fr0000", "ai_001_002_cam_01_fr0003", "sintel_alley_1_frame_0001"):
        Image.fromarray(scene.rgb).save(root / "rgb" / f"{stem}.png")
        _h5_normals(root / "normal" / f"{stem}.h5", scene.normal)
        (root / f"{stem}.json").write_text(json.dumps({"caption": train_normal.PROMPT}))
    args = build_parser(train_normal.RECIPE).parse_args(["--dataset", str(root), "--resolution", "32",
                                                         "--train_batch_size", "1"])
    sources, probs, dataset, _ = build_training_data(args, train_normal.RECIPE)
    shares = {s.name: p for s, p in zip(sources, probs)}
    assert {s.name: len(s) for s in sources} == {"hypersim": 2, "sintel": 1}
    assert shares == pytest.approx({"hypersim": 0.985, "sintel": 0.015})  # the authors' code (--mixing official)
    sample = dataset[0]
    assert sample["target"].shape == (3, 32, 32)
    valid = sample["valid"][0].numpy()
    np.testing.assert_allclose(sample["target"].permute(1, 2, 0).numpy()[valid], scene.normal[valid], atol=1e-6)
    assert not valid.all()  # the blanked rectangles are masked


def test_plain_sources_mix_by_their_declared_source(tmp_path):
    scene = render_scene(6, 32, 32)
    roots = []
    for source in ("hypersim", "sintel"):
        root = tmp_path / source.upper()
        _plain_normal_folder(root, {"x": scene.normal}, scene.rgb)
        (root / "d3_dataset.json").write_text(json.dumps({"source": source}))
        roots.append(str(root))
    parse = build_parser(train_normal.RECIPE).parse_args
    args = parse(["--dataset", roots[0], "--dataset", roots[1], "--train_batch_size", "1"])
    sources, probs, _, _ = build_training_data(args, train_normal.RECIPE)
    assert [s.name for s in sources] == ["hypersim", "sintel"] and probs == pytest.approx([0.985, 0.015])
    args = parse(["--dataset", roots[0], "--dataset", roots[1], "--train_batch_size", "1", "--mixing", "paper"])
    assert build_training_data(args, train_normal.RECIPE)[1] == pytest.approx([0.9, 0.1])  # appendix 6.3
    args = parse(["--dataset", roots[0] + ":0.9", "--dataset", roots[1] + ":0.9", "--train_batch_size", "1"])
    assert build_training_data(args, train_normal.RECIPE)[1] == pytest.approx([0.5, 0.5])


# -------------------------------------------------------------------------------------------------- matting data
def test_p3m_training_layout_and_image_mask_pairs(tmp_path):
    rng = np.random.default_rng(0)
    alpha = np.zeros((24, 40), np.uint8)
    alpha[6:18, 10:30] = 255
    alpha[6:18, 9] = 128  # a soft edge
    p3m = tmp_path / "P3M-10k" / "train"
    (p3m / "blurred_image").mkdir(parents=True)
    (p3m / "mask").mkdir()
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(p3m / "blurred_image" / "p_1.jpg")
    Image.fromarray(alpha).save(p3m / "mask" / "p_1.png")
    [source] = open_sources(p3m, "alpha", 16, train_matting.encode_alpha_target)
    sample = source[0]
    assert sample["target"].shape == (3, 16, 16) and "valid" not in sample  # mattes: the whole image counts
    assert all(torch.equal(sample["target"][0], sample["target"][c]) for c in (1, 2))  # alpha on every channel
    assert math.isclose(float(sample["target"].min()), -1, abs_tol=1e-6)  # background
    assert math.isclose(float(sample["target"].max()), 1, abs_tol=1e-6)  # inside the portrait

    pairs = tmp_path / "cracks"
    (pairs / "images").mkdir(parents=True)
    (pairs / "masks").mkdir()
    green = np.zeros((24, 40, 3), np.uint8)
    green[..., 1] = alpha  # a colour annotation: green on black (evaluate.py reads it as foreground too)
    masks = {"rgbmask": np.repeat(alpha[..., None], 3, 2), "mask16": alpha.astype(np.uint16) * 257, "green": green}
    for name, mask in masks.items():
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(pairs / "images" / f"{name}.jpg")
        Image.fromarray(mask).save(pairs / "masks" / f"{name}.png")
    ds = TrainingFolder(pairs, "alpha", 16, encode_target=train_matting.encode_alpha_target)
    assert len(ds) == len(masks)
    for i, name in enumerate(sorted(masks)):
        # grey-as-RGB, colour and 8-bit agree exactly (all resized in 8 bits, as the authors load mattes); the
        # 16-bit matte is resized in float, so it differs by the 8-bit rounding only (≤ 1/255 in alpha)
        atol = 2.0 / 255 if name == "mask16" else 0.0
        torch.testing.assert_close(ds[i]["target"], sample["target"], atol=atol, rtol=0)


# -------------------------------------------------------------------------------------------------------- losses
@pytest.mark.quick
def test_angular_loss_is_the_mean_arccos_over_the_batchs_valid_pixels_for_non_unit_vectors():
    # sample 0: angles 60° and 135° (non-unit vectors), one masked pixel; sample 1: 90° on its only valid pixel.
    # The authors pool the angle over every valid pixel of the batch: (60° + 135° + 90°) / 3.
    pred = torch.tensor([[[2.0, 0, 0], [0, 3.0, 0], [5.0, 5.0, 5.0]],
                         [[0, 0, 4.0], [1.0, 0, 0], [0, 1.0, 0]]]).permute(0, 2, 1).reshape(2, 3, 1, 3)
    normal = torch.tensor([[[1.0, math.sqrt(3), 0], [0, -1.0, -1.0], [1.0, 0, 0]],
                           [[0, 1.0, 0], [0, 0, 0], [0, 0, 0]]]).permute(0, 2, 1).reshape(2, 3, 1, 3)
    valid = torch.tensor([[True, True, False], [True, False, False]]).view(2, 1, 1, 3)

    def direct(p, t):
        return math.acos(sum(a * b for a, b in zip(p, t)) / math.hypot(*p) / math.hypot(*t))

    assert math.isclose(direct((2, 0, 0), (1, math.sqrt(3), 0)), math.pi / 3, rel_tol=1e-12)
    expected = (direct((2, 0, 0), (1, math.sqrt(3), 0)) + direct((0, 3, 0), (0, -1, -1))
                + direct((0, 0, 4), (0, 1, 0))) / 3
    assert math.isclose(float(normal_losses(pred, normal, normal, valid)["angular"]), expected, rel_tol=1e-6)
    assert math.isclose(expected, (math.pi / 3 + 3 * math.pi / 4 + math.pi / 2) / 3, rel_tol=1e-12)


def test_masked_pixels_do_not_contribute_to_the_normal_loss_or_its_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 6, 6, generator=g)
    normal = torch.nn.functional.normalize(torch.randn(2, 3, 6, 6, generator=g), dim=1)
    valid = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    normal = normal * valid  # invalid ground truth is the zero vector, as the reader gives it
    target = normal  # at the training size the target image is the normals themselves
    other_pred = torch.where(valid, pred, torch.randn(2, 3, 6, 6, generator=g) * 10)
    other_target = torch.where(valid, target, torch.randn(2, 3, 6, 6, generator=g))
    base = train_normal.normal_task_loss(pred, {"target": target, "gt": normal, "valid": valid})
    moved = train_normal.normal_task_loss(other_pred, {"target": other_target, "gt": normal, "valid": valid})
    for term in ("mse", "angular"):
        assert torch.allclose(base[term], moved[term], rtol=1e-6, atol=0), term
    x = pred.clone().requires_grad_(True)
    terms = train_normal.normal_task_loss(x, {"target": target, "gt": normal, "valid": valid})
    sum(train_normal.LOSS_WEIGHTS[k] * v for k, v in terms.items()).backward()
    assert float(x.grad.masked_select(~valid.expand_as(x)).abs().max()) == 0.0
    assert float(x.grad.abs().max()) > 0
    # MSE by hand: pooled over every valid pixel of the batch and the 3 channels
    sq = ((pred - target) ** 2).masked_select(valid.expand_as(pred))
    assert math.isclose(float(base["mse"]), float(sq.mean()), rel_tol=1e-6)


def test_matting_task_loss_by_hand_with_the_paper_weights():
    alpha = torch.zeros(1, 1, 8, 8)
    alpha[..., 4:] = 1.0  # one vertical edge; the prediction is flat alpha = 0
    target = (alpha * 2 - 1).expand(1, 3, 8, 8)
    pred = torch.full((1, 3, 8, 8), -1.0)
    terms = train_matting.matting_task_loss(pred, {"target": target})
    grad = (8 / 56 + 4 / 12 + 2 / 2) / 3  # scales 1, 2, 4 (as in tests/test_losses.py)
    assert math.isclose(float(terms["mse"]), 2.0, rel_tol=1e-6)  # half the pixels off by 2
    assert math.isclose(float(terms["l1"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(terms["grad"]), grad, rel_tol=1e-6)
    total = sum(train_matting.LOSS_WEIGHTS[k] * v for k, v in terms.items())
    assert math.isclose(float(total), 5 * 2.0 + 10 * 1.0 + 50 * grad, rel_tol=1e-6)
    # the gradient term ignores a constant offset (it matches edges, not levels) and is zero on identical maps
    soft = target * 0.4 - 0.3  # alpha in [0.15, 0.55], so the offset below stays inside [0, 1]
    assert float(multiscale_gradient_loss(soft + 0.5, soft)) < 1e-7
    assert float(multiscale_gradient_loss(target, target)) == 0.0


@pytest.mark.quick
def test_recipes_carry_the_paper_prompts_and_weights():
    normal = build_parser(train_normal.RECIPE).parse_args([])
    assert normal.prompt == "A surface normal estimation map."
    assert (normal.lambda_mse, normal.lambda_angular) == (8.0, 3.0)
    matting = build_parser(train_matting.RECIPE).parse_args(["--prompt", "A pavement crack segmentation map."])
    assert matting.prompt == "A pavement crack segmentation map."
    assert (matting.lambda_mse, matting.lambda_l1, matting.lambda_grad) == (5.0, 10.0, 50.0)
    assert train_matting.RECIPE.modality == "alpha" and train_normal.RECIPE.modality == "normal"


# --------------------------------------------------------------------------------- efficient == official-style step
def _to_image(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1


def normal_batch(n: int = 2, size: int = 64) -> dict:
    """Normals at native sizes other than the square (one larger and wider, one smaller and taller)."""
    native = [(size + 16, size + 40), (size - 24, size // 2)]
    scenes = [render_scene(200 + i, *native[i % 2], invalid_fraction=0.15) for i in range(n)]
    normals = [torch.from_numpy(s.normal).permute(2, 0, 1) for s in scenes]
    square = (size, size)
    resize = lambda x: torch.nn.functional.interpolate(x[None], size=square, mode="bilinear")[0]  # noqa: E731
    return {"rgb": torch.stack([resize(_to_image(s.rgb)) for s in scenes]),
            "target": torch.stack([resize(nrm) for nrm in normals]), "gt": normals,
            "valid": [nrm.norm(dim=0, keepdim=True) > 1e-4 for nrm in normals], "path": [f"n{i}" for i in range(n)]}


def matting_batch(n: int = 2, size: int = 64) -> dict:
    scenes = [render_scene(300 + i, size, size) for i in range(n)]
    alpha = torch.stack([torch.from_numpy(s.alpha)[None] for s in scenes])
    return {"rgb": torch.stack([_to_image(s.rgb) for s in scenes]), "target": (alpha * 2 - 1).expand(-1, 3, -1, -1),
            "path": [f"m{i}" for i in range(n)]}


@pytest.mark.parametrize("script, make_batch", [(train_normal, normal_batch), (train_matting, matting_batch)],
                         ids=["normal", "matting"])
def test_efficient_step_equals_official_step(tiny_backbone_dir, script, make_batch):
    """float64: the alignment loss, every task term, the total and every parameter gradient agree to ≤ 1e-5."""
    torch.manual_seed(0)
    parts = build_parts(tiny_backbone_dir, prompt=script.PROMPT)
    for module in (parts.model, parts.teacher, parts.vae):
        module.to(torch.float64)
    parts.prompt_embeds = parts.prompt_embeds.double()
    batch = cast_batch(make_batch(), torch.float64)
    g = torch.Generator().manual_seed(1)
    timesteps = stratified_timesteps(2, 3, generator=g)
    noise = torch.randn(2, 3, 4, 16, 16, generator=g).double()
    results = []
    for step in (d3_step, per_copy_step):
        parts.model.zero_grad(set_to_none=True)
        out = step(parts.model, parts.experts(), parts.vae, parts.prompt_embeds,
                   Objective(script.RECIPE.task_loss, script.LOSS_WEIGHTS), batch, timesteps, noise)
        out.loss.backward()
        results.append((out, grads(parts.model)))
    (fast, fast_grads), (ref, ref_grads) = results
    assert set(ref.task_terms) == set(script.LOSS_WEIGHTS)
    for term in ref.task_terms:
        assert float(ref.task_terms[term].detach()) > 0, term  # every term takes part in what is compared
        assert rel_err(fast.task_terms[term], ref.task_terms[term]) <= REL_TOL, term
    assert rel_err(fast.align, ref.align) <= REL_TOL
    assert rel_err(fast.loss, ref.loss) <= REL_TOL
    assert set(fast_grads) == set(ref_grads) and "student_timestep" in fast_grads
    flat_fast = torch.cat([fast_grads[n].flatten() for n in ref_grads])
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    assert rel_err(flat_fast, flat_ref) <= REL_TOL
    for name, grad in ref_grads.items():
        assert rel_err(fast_grads[name], grad) <= REL_TOL or float(grad.norm()) < 1e-12, name


# ------------------------------------------------------------------------------------------------------ inference
def _images(folder, sizes=((40, 70), (64, 48))) -> list:
    folder.mkdir(parents=True)
    names = []
    for i, (h, w) in enumerate(sizes):
        scene = render_scene(400 + i, h, w)
        Image.fromarray(scene.rgb).save(folder / f"img{i}.png")
        names.append((f"img{i}", scene.rgb))
    return names


@pytest.mark.quick
def test_infer_normal_writes_unit_vectors_and_their_colours(tmp_path, tiny_normal_checkpoint):
    images = _images(tmp_path / "in")
    code = infer.main(["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_normal_checkpoint),
                       "--output", str(tmp_path / "out"), "--processing_res", "64"])  # task from the checkpoint
    assert code == 0
    for stem, rgb in images:
        normal = np.load(tmp_path / "out" / f"{stem}_normal.npy")
        assert normal.shape == rgb.shape and normal.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
        colours = np.asarray(Image.open(tmp_path / "out" / f"{stem}_normal.png"))
        assert colours.shape == rgb.shape and colours.dtype == np.uint8
        np.testing.assert_array_equal(colours, normal_to_rgb(normal))
        np.testing.assert_allclose(colours / 255 * 2 - 1, normal, atol=1 / 255 + 1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{stem}{suffix}" for stem, _ in images for suffix in ("_normal.npy", "_normal.png"))


@pytest.mark.quick
def test_infer_matting_writes_8_and_16_bit_alpha_and_the_cutout(tmp_path, tiny_matting_checkpoint):
    images = _images(tmp_path / "in")
    code = infer.main(["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_matting_checkpoint),
                       "--output", str(tmp_path / "out"), "--processing_res", "64", "--task", "matting"])
    assert code == 0
    for stem, rgb in images:
        alpha8 = np.asarray(Image.open(tmp_path / "out" / f"{stem}_alpha.png"))
        alpha16 = np.asarray(Image.open(tmp_path / "out" / f"{stem}_alpha_16bit.png"))
        rgba = np.asarray(Image.open(tmp_path / "out" / f"{stem}_rgba.png"))
        assert alpha8.dtype == np.uint8 and alpha8.shape == rgb.shape[:2]
        assert alpha16.dtype == np.uint16 and alpha16.shape == rgb.shape[:2]
        assert np.abs(alpha16 / 65535 * 255 - alpha8).max() <= 0.5 + 1e-6  # one matte at two bit depths
        assert rgba.shape == rgb.shape[:2] + (4,)
        np.testing.assert_array_equal(rgba[..., :3], rgb)
        np.testing.assert_array_equal(rgba[..., 3], alpha8)


def test_infer_refuses_a_task_the_checkpoint_was_not_trained_for(tmp_path, tiny_normal_checkpoint, capsys):
    _images(tmp_path / "in", sizes=((32, 32),))
    code = infer.main(["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_normal_checkpoint),
                       "--output", str(tmp_path / "out"), "--task", "matting"])
    assert code == 2
    assert "predicts 'normal', not 'matting'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
