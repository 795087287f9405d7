"""Writers of tiny fixtures in the raw on-disk layouts of the training releases.

Each writer creates a few small files in the real formats (Hypersim HDF5 + split CSV, Virtual KITTI 2
JPEG/uint16 PNG, Marigold's Sintel PNG/npy, P3M-10k JPEG/PNG) and returns what the conversion must
produce, computed from the designed scene rather than from the converter's formulas.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------
# Hypersim

HYP_H, HYP_W = 12, 16
HYP_FOCAL = 886.81 * HYP_W / 1024  # the converter's default for a 16 px wide release

# (row, col, normal that faces the camera along +z but not along the true pixel ray)
TRICKY_NORMALS = [
    (0, 0, (-0.9, 0.0, 0.3)),  # top-left: the ray leans left, so this normal points away from the camera
    (0, 8, (0.0, 0.95, 0.3)),  # top row: the ray leans up; a wrong y sign would keep it
]


def _h5(path: Path, array: np.ndarray) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=array, compression="gzip")


def _pixel_rays(h: int, w: int, f: float) -> np.ndarray:
    """Unit vectors from each pixel's surface point towards the camera (camera frame, y up, z back)."""
    x = np.arange(w) + 0.5 - w / 2
    y = h / 2 - (np.arange(h) + 0.5)
    v = np.stack(np.broadcast_arrays(-x[None, :], -y[:, None], np.full((h, w), f)), axis=-1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _hypersim_frame(root: Path, scene: str, cam: str, frame: int, rng: np.random.Generator) -> dict:
    h, w, f = HYP_H, HYP_W, HYP_FOCAL
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")

    entity = rng.integers(1, 6, size=(h, w)).astype(np.int32)
    entity[-2:, -3:] = -1  # no geometry (a window)
    valid = entity != -1

    # designed planar depth -> distance to the camera centre, as Hypersim stores it (float16)
    z = 1.0 + 0.1 * ii + 0.05 * jj + 0.3 * frame
    x, y = jj + 0.5 - w / 2, ii + 0.5 - h / 2
    dist = (z * np.sqrt(x**2 + y**2 + f**2) / f).astype(np.float16)
    dist[-1, -1] = np.nan  # Hypersim has NaN distances where there is no geometry
    depth_expected = np.where(valid, z, 0.0)

    # HDR colour: grey values, with very bright invalid pixels that must not move the 90th percentile
    grey = rng.uniform(0.01, 3.0, size=(h, w))
    grey[~valid] = 1000.0
    color = np.repeat(grey[..., None], 3, axis=-1).astype(np.float16)

    # normals: random unit vectors facing the camera (away from grazing), some stored back-facing
    rays = _pixel_rays(h, w, f)
    n = rng.normal(size=(h, w, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n *= np.sign(np.sum(n * rays, axis=-1))[..., None]
    n = n + 0.6 * rays  # keep them at least ~30 deg from grazing
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    for r, c, t in TRICKY_NORMALS:
        n[r, c] = np.asarray(t) / np.linalg.norm(t)
        assert np.dot(n[r, c], rays[r, c]) < -0.05 and n[r, c, 2] > 0  # stored back-facing, +z
        n[r, c] *= -1  # the camera-facing truth
    flipped = rng.random((h, w)) < 0.4
    for r, c, _ in TRICKY_NORMALS:
        flipped[r, c] = True
    stored = np.where(flipped[..., None], -n, n) * rng.uniform(0.5, 2.0, size=(h, w, 1))  # not unit length
    stored = stored.astype(np.float16)
    stored[5, 5] = np.nan  # a NaN normal on a valid pixel
    normal_expected = np.where(valid[..., None], n, 0.0)
    normal_expected[5, 5] = 0.0

    base = root / scene / "images"
    stem = f"frame.{frame:04d}"
    _h5(base / f"scene_{cam}_final_hdf5" / f"{stem}.color.hdf5", color)
    geom = base / f"scene_{cam}_geometry_hdf5"
    _h5(geom / f"{stem}.depth_meters.hdf5", dist)
    _h5(geom / f"{stem}.normal_cam.hdf5", stored)
    _h5(geom / f"{stem}.render_entity_id.hdf5", entity)
    return {"depth": depth_expected, "normal": normal_expected, "color": color, "valid": valid,
            "flipped": flipped & valid}


def write_hypersim(root: Path, seed: int = 0) -> dict[str, dict]:
    """Two public train frames and one val frame; an excluded row and a scene missing on disk.

    Returns ``{REL: expectations}`` for every frame written, keyed by the converter's output REL.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = [  # scene, camera, frame, included, exclude_reason, split
        ("ai_001_001", "cam_00", 0, "True", "", "train"),
        ("ai_001_001", "cam_00", 1, "True", "", "train"),
        ("ai_001_001", "cam_00", 2, "True", "bad_lighting", "train"),  # excluded although its files exist
        ("ai_001_002", "cam_01", 0, "True", "", "val"),
        ("ai_001_003", "cam_00", 0, "False", "not_released", "train"),
        ("ai_009_009", "cam_00", 0, "True", "", "train"),  # listed, but not downloaded
    ]
    header = ["scene_name", "camera_name", "frame_id", "included_in_public_release", "exclude_reason",
              "split_partition_name"]
    with open(root / "metadata_images_split_scene_v1.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    expected = {}
    for scene, cam, frame, included, reason, split in rows:
        if scene in ("ai_001_003", "ai_009_009"):
            continue
        exp = _hypersim_frame(root, scene, cam, frame, rng)
        exp["split"] = split
        exp["listed"] = included == "True" and not reason
        expected[f"{scene}/{cam}_fr{frame:04d}"] = exp
    return expected


# --------------------------------------------------------------------------------------------
# Virtual KITTI 2

VK_H, VK_W = 360, 1220  # just above the KITTI benchmark crop (352 x 1216)
# (row, col, raw uint16 centimetres, expected metres; 0 = invalid)
VK_SPECIAL = [(300, 600, 2345, 23.45), (301, 600, 65535, 0.0), (302, 600, 8000, 0.0),
              (303, 600, 7999, 79.99), (304, 600, 0, 0.0), (305, 600, 1, 0.01)]


def _vk_frame(root: Path, scene: str, var: str, cam: str, frame: int, rng: np.random.Generator,
              with_depth: bool = True) -> np.ndarray:
    rgb_dir = root / "rgb" / scene / var / "frames" / "rgb" / cam
    rgb_dir.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, VK_W, dtype=np.float64)[None, :, None]
    rgb = np.clip(ramp + rng.uniform(0, 60, size=(1, 1, 3)) + np.arange(VK_H)[:, None, None] * 0.2, 0, 255)
    Image.fromarray(rgb.astype(np.uint8)).save(rgb_dir / f"rgb_{frame:05d}.jpg", quality=90)
    raw = rng.integers(100, 7000, size=(VK_H, VK_W)).astype(np.uint16)
    raw[:40] = 65535  # sky
    for r, c, v, _ in VK_SPECIAL:
        raw[r, c] = v
    if with_depth:
        depth_dir = root / "depth" / scene / var / "frames" / "depth" / cam
        depth_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw).save(depth_dir / f"depth_{frame:05d}.png")
    return raw


def write_vkitti(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Frames in and out of Marigold's training selection; one RGB frame lacks its depth.

    Returns ``{REL: raw uint16 depth}`` of the frames the default selection must convert.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = {}
    for scene, var, cam, frame in [("Scene02", "clone", "Camera_0", 0), ("Scene02", "clone", "Camera_0", 1),
                                   ("Scene06", "sunset", "Camera_1", 7)]:
        out[f"{scene}/{var}/{cam}/{frame:05d}"] = _vk_frame(root, scene, var, cam, frame, rng)
    _vk_frame(root, "Scene01", "clone", "Camera_0", 0, rng)  # validation scene: not in the default set
    _vk_frame(root, "Scene02", "fog", "Camera_0", 0, rng)  # excluded weather
    _vk_frame(root, "Scene02", "clone", "Camera_1", 0, rng, with_depth=False)  # broken download
    return out


# --------------------------------------------------------------------------------------------
# Sintel (Marigold's preprocessed normals)

SIN_H, SIN_W = 6, 450  # 221 px cut from each side leaves 8 columns


def write_sintel(root: Path, seed: int = 0) -> dict[str, dict]:
    """``root/<scene>/frame_NNNN_img.png`` + ``_normal.npy``; sky pixels have (near-)zero normals."""
    rng = np.random.default_rng(seed)
    out = {}
    for scene, frame in [("alley_2", 1), ("alley_2", 2), ("market_5", 10)]:
        d = Path(root) / scene
        d.mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 256, size=(SIN_H, SIN_W, 3), dtype=np.uint8)
        n = rng.normal(size=(SIN_H, SIN_W, 3))
        n[..., 2] = np.abs(n[..., 2])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n = n.astype(np.float32)
        sky = np.zeros((SIN_H, SIN_W), bool)
        sky[0, :] = True
        n[0, :] = 0.0
        n[1, 225] = (0.05, 0.0, 0.0)  # short vector: also sky
        sky[1, 225] = True
        Image.fromarray(rgb).save(d / f"frame_{frame:04d}_img.png")
        np.save(d / f"frame_{frame:04d}_normal.npy", n)
        out[f"{scene}/frame_{frame:04d}"] = {"rgb": rgb, "normal": n, "sky": sky}
    (Path(root) / "sintel_filtered.txt").write_text(
        "alley_2/frame_0001_img.png alley_2/frame_0001_normal.npy\n"
        "market_5/frame_0010_img.png market_5/frame_0010_normal.npy\n")
    return out


# --------------------------------------------------------------------------------------------
# P3M-10k


def write_p3m(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/P3M-10k/train/{blurred_image,mask}``: a greyscale mask, an RGB-saved mask, a missing mask."""
    rng = np.random.default_rng(seed)
    train = Path(root) / "P3M-10k" / "train"
    (train / "blurred_image").mkdir(parents=True)
    (train / "mask").mkdir(parents=True)
    out = {}
    for i, stem in enumerate(["p_0a1b", "p_0c2d", "p_nomask"]):
        h, w = 20 + i, 14 + 2 * i
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(train / "blurred_image" / f"{stem}.jpg", quality=92)
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        alpha[:3] = 0
        alpha[-3:] = 255
        if stem == "p_0a1b":
            Image.fromarray(alpha).save(train / "mask" / f"{stem}.png")
        elif stem == "p_0c2d":
            Image.fromarray(np.repeat(alpha[..., None], 3, axis=-1)).save(train / "mask" / f"{stem}.png")
        if stem != "p_nomask":
            out[stem] = alpha
    return out
