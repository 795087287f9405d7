"""Sintel normals (Marigold's preprocessed release) -> plain folder with rgb and normals
(docs/protocols.md, "Training data").

The raw MPI Sintel release has no normals; the usual source is Marigold's ``sintel`` folder::

    SRC/<scene>/frame_NNNN_img.png       1024x436 RGB
    SRC/<scene>/frame_NNNN_normal.npy    (H, W, 3) float normals

Frame assumption: Marigold trains on these arrays with no axis change and evaluates in Hypersim's
camera frame (x right, y up, z towards the viewer), so they are taken to be in our frame already and
copied without flips. As Marigold's loader does, pixels with ||n|| <= 0.1 (the sky) become the
camera-facing (0, 0, 1), and with ``--crop`` (default) 221 columns are cut from each side
(1024 -> 582 wide), on the RGB as well. ``--list`` restricts to a Marigold file list such as
``sintel_filtered.txt`` (627 frames; lines ``alley_2/frame_0001_img.png alley_2/frame_0001_normal.npy``).

Output REL: ``<scene>/frame_NNNN``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from .common import NORMAL_FRAME, Counts, PlainFolder, Sample, run_conversion

CROP = 221
SKY_NORM = 0.1


def fix_normals(normal: np.ndarray, crop: int) -> np.ndarray:
    """Sky (||n|| <= 0.1) -> (0, 0, 1), then cut ``crop`` columns from each side. float32 (H, W', 3)."""
    n = np.array(normal, dtype=np.float32)
    if n.ndim != 3 or n.shape[-1] != 3:
        raise ValueError(f"expected normals of shape (H, W, 3), got {n.shape}")
    sky = ~(np.linalg.norm(n, axis=-1) > SKY_NORM)  # NaN counts as sky too
    n[sky] = (0.0, 0.0, 1.0)
    return crop_columns(n, crop)


def crop_columns(array: np.ndarray, crop: int) -> np.ndarray:
    if crop <= 0:
        return array
    if array.shape[1] <= 2 * crop:
        raise ValueError(f"width {array.shape[1]} is too small to crop {crop} px from each side")
    return np.ascontiguousarray(array[:, crop : array.shape[1] - crop])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crop", action=argparse.BooleanOptionalAction, default=True,
                   help=f"cut {CROP} px from the left and right (Marigold's 582x436 centre crop); default on")
    p.add_argument("--list", type=Path, default=None, help="Marigold file list (e.g. sintel_filtered.txt)")


def convert_frame(sample: Sample, crop: int) -> dict:
    img_path, normal_path = sample.item
    normal = np.load(normal_path)
    with Image.open(img_path) as im:
        size = im.size
        rgb = np.asarray(im.convert("RGB")) if crop else None
    if normal.shape[:2] != (size[1], size[0]):
        raise ValueError(f"image is {size[0]}x{size[1]} but normals are {normal.shape}")
    out = {"normal": fix_normals(normal, crop)}
    out["rgb"] = crop_columns(rgb, crop) if crop else img_path
    return out


def _pairs(src: Path, list_file: Path | None) -> list[tuple[Path, Path]]:
    if list_file is not None:
        pairs = []
        for line in Path(list_file).read_text().splitlines():
            cols = line.split()
            if len(cols) >= 2:
                pairs.append((src / cols[0], src / cols[1]))
        return pairs
    return [(p, p.with_name(p.name[: -len("_img.png")] + "_normal.npy")) for p in sorted(src.glob("*/*_img.png"))]


def run(args: argparse.Namespace) -> Counts:
    src = Path(args.src)
    crop = CROP if args.crop else 0
    samples = []
    for img, normal in _pairs(src, args.list):
        rel = img.relative_to(src).as_posix()[: -len("_img.png")] if img.name.endswith("_img.png") else \
            img.relative_to(src).with_suffix("").as_posix()
        samples.append(Sample(rel=rel, group=rel.split("/")[0], outputs={"rgb": ".png", "normal": ".npy"},
                              item=(img, normal)))
    if not samples:
        raise SystemExit(f"{src}: no frames found; expected <scene>/frame_NNNN_img.png + frame_NNNN_normal.npy")
    folder = PlainFolder(args.dst, "sintel", {"crop": crop},
                         {"modalities": ["normal"], "normal_frame": NORMAL_FRAME})
    convert = functools.partial(convert_frame, crop=crop)
    return run_conversion("sintel", folder, samples, convert, workers=args.workers)
