"""Tests of the procedural scenes: exact geometry, soft mattes, determinism, the folder writer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3.data.synthetic import (
    Box,
    Camera,
    Material,
    Plane,
    Rect,
    SceneDescription,
    Sphere,
    render,
    render_scene,
    rotation_matrix,
    scene_seed,
    write_synthetic_dataset,
)

REPO = Path(__file__).resolve().parents[1]
WHITE = Material(color=(1.0, 1.0, 1.0))
GREY = Material(color=(0.5, 0.5, 0.5))


def camera_points(camera: Camera, depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame points of a depth map, by the pinhole model written out here."""
    rows, cols = np.mgrid[0 : camera.height, 0 : camera.width] + 0.5
    cx = camera.width / 2 if camera.cx is None else camera.cx
    cy = camera.height / 2 if camera.cy is None else camera.cy
    rays = np.stack([(cols - cx) / camera.focal, (cy - rows) / camera.focal, -np.ones_like(cols)], -1)
    return depth[..., None].astype(np.float64) * rays


def back_wall(distance: float, material: Material = GREY) -> Plane:
    return Plane((0.0, 0.0, -distance), (0.0, 0.0, 1.0), material)


# ---------------------------------------------------------------- exact geometry


@pytest.mark.parametrize("size, focal, principal", [((33, 47), None, None), ((24, 32), 20.0, (13.0, 9.5))])
def test_fronto_parallel_plane_has_exact_depth_and_normal(size, focal, principal):
    height, width = size
    if focal is None:
        camera = Camera.from_fov(width, height)
    else:
        camera = Camera(width, height, focal, None, *principal)
    scene = render(SceneDescription(camera, [back_wall(3.7)]))
    assert np.all(scene.depth == np.float32(3.7))
    assert np.all(scene.normal == np.array([0.0, 0.0, 1.0], dtype=np.float32))
    assert np.all(scene.alpha == 0.0)


def test_plane_seen_from_behind_is_invisible():
    scene = render(SceneDescription(Camera.from_fov(16, 16), [Plane((0, 0, -2.0), (0, 0, -1.0))]))
    assert np.all(scene.depth == 0) and np.all(scene.normal == 0)


def test_sphere_depth_points_and_normals():
    camera = Camera.from_fov(65, 65)  # odd size: the centre pixel's ray is the optical axis
    centre, radius = np.array([0.0, 0.0, -5.0]), 1.0
    scene = render(SceneDescription(camera, [Sphere(centre, radius), back_wall(8.0)]))
    assert scene.depth[32, 32] == pytest.approx(5.0 - radius, abs=1e-5)
    np.testing.assert_allclose(scene.normal[32, 32], [0, 0, 1], atol=1e-6)

    on_sphere = scene.alpha == 1.0
    assert on_sphere.sum() > 200
    points = camera_points(camera, scene.depth)[on_sphere]
    np.testing.assert_allclose(np.linalg.norm(points - centre, axis=1), radius, atol=1e-4)
    np.testing.assert_allclose(scene.normal[on_sphere], (points - centre) / radius, atol=1e-4)
    rays = camera_points(camera, np.ones(scene.depth.shape))[on_sphere]
    assert np.all(np.einsum("ij,ij->i", scene.normal[on_sphere], rays) < 0)  # camera-facing


def test_floor_normal_for_level_and_pitched_camera():
    floor = Plane((0.0, -1.5, 0.0), (0.0, 1.0, 0.0), GREY)
    for pitch in (0.0, -10.0):
        rotation = rotation_matrix(pitch=pitch)
        camera = Camera.from_fov(40, 30, rotation=rotation)
        scene = render(SceneDescription(camera, [floor, back_wall(6.0)]))
        bottom = scene.depth[-1] > 0
        expected = rotation.T @ np.array([0.0, 1.0, 0.0])  # the world's up, in camera axes
        np.testing.assert_allclose(scene.normal[-1][bottom], np.tile(expected, (bottom.sum(), 1)), atol=1e-6)
        world = camera_points(camera, scene.depth)[-1] @ rotation.T
        np.testing.assert_allclose(world[:, 1], -1.5, atol=1e-5)  # the hits lie on the floor
    level = render(SceneDescription(Camera.from_fov(40, 30), [floor, back_wall(6.0)]))
    assert np.array_equal(level.normal[-1, 0], np.array([0.0, 1.0, 0.0], dtype=np.float32))


def test_box_faces():
    camera = Camera.from_fov(49, 49)
    box = Box((0.0, 0.0, -4.0), (0.5, 0.4, 0.3))
    scene = render(SceneDescription(camera, [box, back_wall(9.0)]))
    assert scene.depth[24, 24] == pytest.approx(4.0 - 0.3, abs=1e-5)  # the front face
    np.testing.assert_allclose(scene.normal[24, 24], [0, 0, 1], atol=1e-6)

    rotation = rotation_matrix(30.0, 20.0, 10.0)
    turned = Box((0.3, -0.2, -3.0), (0.6, 0.5, 0.4), rotation)
    scene = render(SceneDescription(camera, [turned, back_wall(9.0)]))
    inside = scene.alpha == 1.0
    local = (camera_points(camera, scene.depth)[inside] - turned.center) @ rotation
    ratio = np.abs(local) / np.array(turned.half_size)
    np.testing.assert_allclose(ratio.max(axis=1), 1.0, atol=1e-4)  # on the surface
    normals = scene.normal[inside]
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(np.round(normals, 3), axis=0)) == 3  # three faces show
    rays = camera_points(camera, np.ones(scene.depth.shape))[inside]
    assert np.all(np.einsum("ij,ij->i", normals, rays) < 0)


def test_rect_is_two_sided_and_bounded():
    camera = Camera.from_fov(41, 41)
    away = rotation_matrix(yaw=180.0 + 20.0)  # its normal points away from the camera
    card = Rect((0.0, 0.0, -3.0), (0.5, 0.5), away, WHITE)
    scene = render(SceneDescription(camera, [card, back_wall(5.0)]))
    assert scene.alpha[20, 20] == 1.0 and scene.alpha[0, 0] == 0.0
    n = scene.normal[20, 20]
    assert n[2] > 0.9 and n @ np.array([0.0, 0.0, -1.0]) < 0  # flipped to face the camera
    assert scene.depth[20, 20] == pytest.approx(3.0, abs=1e-5)


# ---------------------------------------------------------------- alpha and colour


def test_alpha_is_a_soft_matte_with_the_right_area():
    camera = Camera.from_fov(64, 64)
    centre, radius = np.array([0.0, 0.0, -6.0]), 1.2
    scene = render(SceneDescription(camera, [Sphere(centre, radius), back_wall(9.0)]), supersample=4)
    assert scene.alpha[32, 32] == 1.0 and scene.alpha[0, 0] == 0.0
    edge = (scene.alpha > 0) & (scene.alpha < 1)
    assert edge.sum() > 20
    # The image of a sphere on the optical axis is a disc of radius f * r / sqrt(d^2 - r^2).
    disc_radius = camera.focal * radius / np.sqrt(centre @ centre - radius**2)
    assert scene.alpha.sum() == pytest.approx(np.pi * disc_radius**2, rel=0.01)
    binary = render(SceneDescription(camera, [Sphere(centre, radius)]), supersample=1).alpha
    assert set(np.unique(binary)) == {0.0, 1.0}  # without supersampling the matte is hard


def test_silhouette_pixels_obey_the_compositing_equation():
    camera = Camera.from_fov(48, 48)
    light = (0.0, 0.0, 1.0)
    fg, bg = np.array([0.9, 0.2, 0.1]), np.array([0.1, 0.3, 0.8])
    card = Rect((0.1, 0.05, -3.0), (0.6, 0.5), rotation_matrix(roll=17.0), Material(tuple(fg)))
    scene = render(SceneDescription(camera, [card, back_wall(6.0, Material(tuple(bg)))], light, ambient=0.0))
    edge = (scene.alpha > 0) & (scene.alpha < 1)
    assert edge.sum() > 20
    expected = scene.alpha[edge, None] * fg + (1 - scene.alpha[edge, None]) * bg
    np.testing.assert_allclose(scene.rgb[edge] / 255.0, expected, atol=1 / 255 + 1e-6)


def test_lambertian_shading():
    camera = Camera.from_fov(8, 8)
    wall = [back_wall(2.0, WHITE)]
    head_on = render(SceneDescription(camera, wall, light_direction=(0, 0, 1), ambient=0.2))
    assert np.all(head_on.rgb == 255)
    tilted = render(SceneDescription(camera, wall, light_direction=(0, np.sin(np.pi / 3), 0.5), ambient=0.2))
    assert np.all(tilted.rgb == round(255 * (0.2 + 0.8 * 0.5)))
    behind = render(SceneDescription(camera, wall, light_direction=(0, 0, -1), ambient=0.3))
    assert np.all(behind.rgb == round(255 * 0.3))


def test_textures_and_their_filtering():
    camera = Camera.from_fov(64, 64)
    checker = Material((1.0, 1.0, 1.0), "checker", (0.0, 0.0, 0.0), period=0.25)
    stripes = Material((1.0, 1.0, 1.0), "stripes", (0.0, 0.0, 0.0), period=0.25, angle=30.0)
    for material in (checker, stripes):
        surfaces = [back_wall(4.0, material)]
        sharp = render(SceneDescription(camera, surfaces, (0, 0, 1), ambient=0.0), supersample=1)
        assert set(np.unique(sharp.rgb)) == {0, 255}  # point-sampled: two colours
        smooth = render(SceneDescription(camera, surfaces, (0, 0, 1), ambient=0.0))
        between = (smooth.rgb[..., 0] > 20) & (smooth.rgb[..., 0] < 235)
        assert between.mean() > 0.1  # texture boundaries are anti-aliased
        assert smooth.rgb.mean() == pytest.approx(127.5, abs=10)  # ... without shifting the mean
        assert np.all(smooth.depth == sharp.depth) and np.all(smooth.alpha == 0)


# ---------------------------------------------------------------- random scenes


@pytest.mark.quick
def test_render_scene_is_deterministic():
    a, b = render_scene(7), render_scene(7)
    for name in ("rgb", "depth", "normal", "alpha"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.depth, render_scene(8).depth)


@pytest.mark.quick
def test_random_scene_contract():
    for seed in range(8):
        scene = render_scene(seed, 48, 64)
        assert scene.rgb.shape == (48, 64, 3) and scene.rgb.dtype == np.uint8
        assert scene.depth.shape == (48, 64) and scene.depth.dtype == np.float32
        assert scene.normal.shape == (48, 64, 3) and scene.normal.dtype == np.float32
        assert scene.alpha.shape == (48, 64) and scene.alpha.dtype == np.float32
        assert np.all(scene.depth > 0.5) and np.all(scene.depth < 20.0)  # all valid by default
        np.testing.assert_allclose(np.linalg.norm(scene.normal, axis=-1), 1.0, atol=1e-5)
        camera = Camera.from_fov(64, 48)
        rays = camera_points(camera, np.ones((48, 64)))
        assert np.all(np.einsum("hwc,hwc->hw", scene.normal, rays) < 0)
        assert scene.alpha.min() == 0.0 and scene.alpha.max() == 1.0
        assert np.any((scene.alpha > 0) & (scene.alpha < 1))
        assert scene.rgb.std() > 5


def test_depth_statistics_vary_across_scenes():
    scenes = [render_scene(seed, 32, 32) for seed in range(40)]
    medians = np.array([np.median(s.depth) for s in scenes])
    ranges = np.array([s.depth.max() / s.depth.min() for s in scenes])
    assert medians.max() / medians.min() > 2.0  # affine-invariant depth is not trivial
    assert np.median(ranges) > 2.0
    assert 0.5 < min(s.depth.min() for s in scenes) and max(s.depth.max() for s in scenes) < 15.0


def test_invalid_fraction_blanks_depth_and_normals_only():
    clean, holes = render_scene(3), render_scene(3, invalid_fraction=0.15)
    invalid = holes.depth == 0
    assert 0.15 <= invalid.mean() < 0.3
    assert np.array_equal(invalid, np.all(holes.normal == 0, axis=-1))
    assert np.array_equal(holes.depth[~invalid], clean.depth[~invalid])
    assert np.array_equal(holes.rgb, clean.rgb) and np.array_equal(holes.alpha, clean.alpha)


def test_rendering_is_fast():
    render_scene(0)
    start = time.perf_counter()
    for seed in range(10):
        render_scene(seed)
    assert (time.perf_counter() - start) / 10 < 0.1  # typically a few ms; generous for shared CI


# ---------------------------------------------------------------- the training folder


def read_folder(root: Path, index: int) -> dict[str, np.ndarray]:
    name = f"scene_{index:05d}"
    return {
        "rgb": np.asarray(Image.open(root / "rgb" / f"{name}.png")),
        "depth": np.load(root / "depth" / f"{name}.npy"),
        "normal": np.load(root / "normal" / f"{name}.npy"),
        "alpha": np.asarray(Image.open(root / "alpha" / f"{name}.png"), dtype=np.float64) / 65535,
    }


@pytest.mark.quick
def test_written_folder_round_trips(tmp_path):
    root = write_synthetic_dataset(tmp_path / "train", 3, height=24, width=40, seed=5, invalid_fraction=0.1)
    meta = json.loads((root / "d3_dataset.json").read_text())
    assert meta["source"] == "synthetic" and meta["depth_kind"] == "metric" and meta["num_samples"] == 3
    for i in range(3):
        files = read_folder(root, i)
        scene = render_scene(scene_seed(5, i), 24, 40, invalid_fraction=0.1)
        assert np.array_equal(files["rgb"], scene.rgb)
        assert np.array_equal(files["depth"], scene.depth) and files["depth"].dtype == np.float32
        assert np.array_equal(files["normal"], scene.normal) and files["normal"].dtype == np.float32
        np.testing.assert_allclose(files["alpha"], scene.alpha, atol=0.5 / 65535 + 1e-7)
        valid = files["depth"][files["depth"] > 0]
        assert meta["min_depth"] < valid.min() and valid.max() < meta["max_depth"]
    assert sorted(p.name for p in root.iterdir()) == ["alpha", "d3_dataset.json", "depth", "normal", "rgb"]


def test_scenes_do_not_depend_on_dataset_size_and_seeds_do_not_overlap(tmp_path):
    small = write_synthetic_dataset(tmp_path / "a", 2, 16, 16, seed=0, tasks=("depth",))
    large = write_synthetic_dataset(tmp_path / "b", 3, 16, 16, seed=0, tasks=("depth",))
    for i in range(2):
        name = f"depth/scene_{i:05d}.npy"
        assert np.array_equal(np.load(small / name), np.load(large / name))
    assert not (small / "normal").exists() and not (small / "alpha").exists()
    train = {scene_seed(0, i) for i in range(1000)}
    held_out = {scene_seed(1, i) for i in range(1000)}
    assert not train & held_out


def test_writer_rejects_unknown_tasks(tmp_path):
    with pytest.raises(ValueError, match="segmentation"):
        write_synthetic_dataset(tmp_path, 1, tasks=("depth", "segmentation"))
    with pytest.raises(ValueError, match="pattern"):
        Material(pattern="dots")
    with pytest.raises(ValueError, match="invalid_fraction"):
        render_scene(0, invalid_fraction=1.0)


@pytest.mark.quick
def test_command_line(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "d3.data.synthetic", "--output", str(out), "--num_scenes", "2",
               "--height", "16", "--width", "24", "--seed", "3", "--quiet"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    assert json.loads((out / "d3_dataset.json").read_text())["num_samples"] == 2
    assert np.array_equal(read_folder(out, 1)["depth"], render_scene(scene_seed(3, 1), 16, 24).depth)
