"""Hypersim (official HDF5 release) -> plain folder with rgb, planar depth and camera-facing normals.

Follows Marigold's preprocessing (docs/protocols.md, "Training data"):

* RGB: ``final_hdf5/frame.NNNN.color.hdf5`` (linear HDR) is tone-mapped as Hypersim's own tool does:
  gamma 1/2.2, scaled so that the 90th percentile of the CCIR601 brightness (0.3 R + 0.59 G + 0.11 B)
  of the valid pixels (render_entity_id != -1) becomes 0.8 after the gamma, clipped to [0, 1], then
  ``uint8(255 * x)`` (truncation, as Marigold).
* Depth: ``depth_meters.hdf5`` holds the distance to the camera centre; the planar depth is
  ``z = dist * f / ||(x, y, f)||`` with pixel-centre image-plane coordinates and f = 886.81 px for the
  1024x768 release (a 60 deg horizontal field of view; scaled with the width for other sizes).
  Pixels with ``render_entity_id == -1`` (no geometry) or a non-finite distance become 0 (invalid).
  Written as float32 metres (``.npy``, exact) or, with ``--depth_format png``, uint16 millimetres
  (Marigold's encoding, rounded). Loss range 1e-5 < d < 65 m.
* Normals: ``normal_cam.hdf5`` (camera frame x right, y up, z backwards = towards the viewer,
  which is already our convention), L2-normalised, and flipped where they face away from the
  camera. Marigold tests ``n_world . (cam_pos - pos_world) < -1e-3``; we do the same test in camera
  space, where it needs nothing but the pixel ray: the surface point of pixel (row i, col j) lies at
  ``s * (x, y, -f)`` with ``x = j + 0.5 - W/2``, ``y = H/2 - (i + 0.5)`` and s > 0, so the vector from it
  to the camera centre is along ``(-x, -y, f)``, and a normal is back-facing when
  ``n_cam . (-x, -y, f) / ||(x, y, f)|| < -1e-3``. This is the same quantity as Marigold's (a rotation
  preserves dot products) as long as the scene uses the standard pinhole camera; the few Hypersim
  scenes rendered with a tilt-shift camera matrix shift the ray slightly, which can only change the
  verdict for near-grazing normals. Marigold skips whole frames that contain a NaN normal; we keep
  the frame and mark non-finite, zero-length and no-geometry pixels invalid (0, 0, 0) instead, so
  depth and normals come from the same frames.

Output REL: ``<scene>/<camera>_frNNNN`` (e.g. ``ai_001_001/cam_00_fr0000``).
"""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

import numpy as np

from .common import NORMAL_FRAME, Counts, PlainFolder, Sample, run_conversion

FOCAL_1024 = 886.81  # px, Hypersim's 60 deg horizontal field of view at 1024 px width
MIN_DEPTH, MAX_DEPTH = 1e-5, 65.0
DEPTH_PNG_SCALE = 0.001  # metres per uint16 unit: millimetres
SPLIT_CSV = "metadata_images_split_scene_v1.csv"


# --------------------------------------------------------------------------------------------
# The conversions (pure functions, tested on their own)


def tone_map(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Hypersim's tone-mapping of a linear HDR image (H, W, 3) -> float in [0, 1]."""
    gamma = 1.0 / 2.2
    rgb = np.nan_to_num(np.asarray(rgb, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not np.any(valid):
        scale = 1.0
    else:
        brightness = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
        p90 = np.percentile(brightness[valid], 90)
        scale = 0.0 if p90 < 1e-4 else np.power(0.8, 1.0 / gamma) / p90
    return np.clip(np.power(np.maximum(scale * rgb, 0.0), gamma), 0.0, 1.0)


def image_plane(height: int, width: int, focal: float) -> np.ndarray:
    """Camera-frame direction of each pixel centre (x right, y up, z backwards): (x, y, -f), (H, W, 3)."""
    x = np.arange(width, dtype=np.float64) + 0.5 - 0.5 * width
    y = 0.5 * height - (np.arange(height, dtype=np.float64) + 0.5)
    grid = np.empty((height, width, 3), np.float64)
    grid[..., 0] = x[None, :]
    grid[..., 1] = y[:, None]
    grid[..., 2] = -focal
    return grid


def planar_depth(distance: np.ndarray, focal: float) -> np.ndarray:
    """Distance to the camera centre -> depth along the optical axis."""
    h, w = distance.shape
    norm = np.linalg.norm(image_plane(h, w, focal), axis=-1)
    return np.asarray(distance, np.float64) * focal / norm


def camera_facing_normals(normal_cam: np.ndarray, focal: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Unit normals flipped to face the camera; invalid pixels -> (0, 0, 0). float32 (H, W, 3)."""
    n = np.asarray(normal_cam, np.float64)
    h, w, _ = n.shape
    finite = np.all(np.isfinite(n), axis=-1)
    n = np.where(finite[..., None], n, 0.0)
    norm = np.linalg.norm(n, axis=-1)
    ok = finite & (norm > 1e-6)
    if valid is not None:
        ok &= valid
    n = n / np.where(ok, norm, 1.0)[..., None]
    to_camera = -image_plane(h, w, focal)
    to_camera /= np.linalg.norm(to_camera, axis=-1, keepdims=True)
    back = np.sum(n * to_camera, axis=-1) < -1e-3
    n[back] *= -1.0
    n[~ok] = 0.0
    return n.astype(np.float32)


def focal_for_width(width: int, focal: float | None) -> float:
    return float(focal) if focal else FOCAL_1024 * width / 1024.0


# --------------------------------------------------------------------------------------------
# Reading the release


def read_h5(path: Path) -> np.ndarray:
    import h5py

    if not Path(path).exists():
        raise FileNotFoundError(2, "No such file", str(path))
    with h5py.File(path, "r") as f:
        return f["dataset"][()]


def frame_paths(src: Path, scene: str, cam: str, frame: int) -> dict[str, Path]:
    images = Path(src) / scene / "images"
    final, geom = images / f"scene_{cam}_final_hdf5", images / f"scene_{cam}_geometry_hdf5"
    stem = f"frame.{frame:04d}"
    return {
        "color": final / f"{stem}.color.hdf5",
        "distance": geom / f"{stem}.depth_meters.hdf5",
        "normal": geom / f"{stem}.normal_cam.hdf5",
        "entity": geom / f"{stem}.render_entity_id.hdf5",
    }


def read_split(csv_path: Path, split: str) -> list[tuple[str, str, int]]:
    """(scene, camera, frame) of the public-release, non-excluded rows of a split ("all" = every split)."""
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{csv_path}: missing columns {sorted(missing)}; expected Hypersim's {SPLIT_CSV}")
        for r in reader:
            if r["included_in_public_release"].strip().lower() not in ("true", "1"):
                continue
            if (r.get("exclude_reason") or "").strip().lower() not in ("", "nan", "none"):
                continue
            if split != "all" and r["split_partition_name"].strip() != split:
                continue
            rows.append((r["scene_name"].strip(), r["camera_name"].strip(), int(float(r["frame_id"]))))
    return rows


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    p.add_argument("--split_csv", type=Path, default=None, help=f"default: SRC/{SPLIT_CSV}")
    p.add_argument("--scenes", default=None, help="comma-separated scene names to keep (default: all in the split)")
    p.add_argument("--depth_format", default="npy", choices=["npy", "png"],
                   help="npy: float32 metres (exact); png: uint16 millimetres (Marigold's encoding, 1/3 the size)")
    p.add_argument("--no_normals", action="store_true", help="write rgb and depth only")
    p.add_argument("--normal_dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--focal", type=float, default=None, help="focal length in px (default 886.81 * width / 1024)")


def convert_frame(sample: Sample, src: Path, depth_format: str, normals: bool, normal_dtype: str,
                  focal: float | None) -> dict:
    paths = frame_paths(src, *sample.item)
    entity = read_h5(paths["entity"])
    valid = entity != -1
    color = read_h5(paths["color"])
    distance = read_h5(paths["distance"]).astype(np.float64)
    h, w = distance.shape
    if color.shape[:2] != (h, w) or entity.shape != (h, w):
        raise ValueError(f"size mismatch: color {color.shape}, depth {distance.shape}, entity {entity.shape}")
    f = focal_for_width(w, focal)

    out: dict = {"rgb": (tone_map(color, valid) * 255.0).astype(np.uint8)}
    depth = planar_depth(distance, f)
    depth[~valid | ~np.isfinite(depth)] = 0.0
    if depth_format == "png":
        out["depth"] = np.clip(np.round(depth / DEPTH_PNG_SCALE), 0, 65535).astype(np.uint16)
    else:
        out["depth"] = depth.astype(np.float32)
    if normals:
        normal = read_h5(paths["normal"])
        if normal.shape != (h, w, 3):
            raise ValueError(f"normal_cam has shape {normal.shape}, expected {(h, w, 3)}")
        out["normal"] = camera_facing_normals(normal, f, valid).astype(normal_dtype)
    return out


def run(args: argparse.Namespace) -> Counts:
    src = Path(args.src)
    csv_path = args.split_csv or src / SPLIT_CSV
    if not Path(csv_path).exists():
        raise SystemExit(f"{csv_path}: not found; pass --split_csv or point --src at the Hypersim release root")
    rows = read_split(csv_path, args.split)
    if args.scenes:
        keep = {s.strip() for s in args.scenes.split(",") if s.strip()}
        rows = [r for r in rows if r[0] in keep]
    present = {r[0] for r in rows if (src / r[0]).is_dir()}
    absent = sorted({r[0] for r in rows} - present)

    normals = not args.no_normals
    outputs = {"rgb": ".png", "depth": f".{args.depth_format}"}
    if normals:
        outputs["normal"] = ".npy"
    samples = [Sample(rel=f"{scene}/{cam}_fr{frame:04d}", group=scene, outputs=outputs, item=(scene, cam, frame))
               for scene, cam, frame in rows if scene in present]

    settings = {"depth_format": args.depth_format, "normals": normals, "normal_dtype": args.normal_dtype,
                "focal": args.focal}
    meta = {"modalities": ["depth", "normal"] if normals else ["depth"], "depth_kind": "metric",
            "min_depth": MIN_DEPTH, "max_depth": MAX_DEPTH}
    if args.depth_format == "png":
        meta["depth_png_scale"] = DEPTH_PNG_SCALE
    if normals:
        meta["normal_frame"] = NORMAL_FRAME
    folder = PlainFolder(args.dst, "hypersim", settings, meta)
    counts = Counts()
    counts.notes["split"] = args.split
    if absent:
        counts.notes["scenes not under --src (not converted)"] = (
            f"{len(absent)} ({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''})")
    convert = functools.partial(convert_frame, src=src, depth_format=args.depth_format, normals=normals,
                                normal_dtype=args.normal_dtype, focal=args.focal)
    return run_conversion("hypersim", folder, samples, convert, workers=args.workers, counts=counts)
