"""Virtual KITTI 2 -> plain folder with rgb and metric depth (docs/protocols.md, "Training data").

Raw layout (the official rgb and depth archives, extracted under ``SRC/rgb`` and ``SRC/depth``, or
both merged into SRC itself)::

    rgb/SceneXX/<variation>/frames/rgb/Camera_k/rgb_NNNNN.jpg
    depth/SceneXX/<variation>/frames/depth/Camera_k/depth_NNNNN.png   uint16 centimetres

Depth = value / 100 m. The raw maximum 65535 (655.35 m) is the sky. Pixels at or beyond the 80 m cap
(the sky included) and zeros are written as 0 = invalid, i.e. the file keeps exactly the pixels that
Marigold's valid mask 1e-5 < d < 80 keeps. Defaults select Marigold's training set: Scenes 02, 06, 18
and 20 x {15-deg-left, 15-deg-right, clone, morning, overcast, sunset} x both cameras (20 148
frames); Scene01 is its validation scene, fog and rain are left out. ``--kb_crop`` applies the KITTI
benchmark crop (bottom 352 rows, centred 1216 columns) that Marigold uses for training; RGB is then
re-encoded as PNG, otherwise the JPEG is copied byte for byte.

Output REL: ``SceneXX/<variation>/Camera_k/NNNNN``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from .common import Counts, PlainFolder, Sample, run_conversion

SCENES = ("Scene02", "Scene06", "Scene18", "Scene20")
VARIATIONS = ("15-deg-left", "15-deg-right", "clone", "morning", "overcast", "sunset")
CAMERAS = ("Camera_0", "Camera_1")
MIN_DEPTH, MAX_DEPTH = 1e-5, 80.0
SKY = 65535
KB_H, KB_W = 352, 1216
DEPTH_PNG_SCALE = 0.01  # metres per uint16 unit: centimetres, as the release (mm would overflow at 65.5 m)


def decode_depth(raw: np.ndarray, max_depth: float = MAX_DEPTH) -> np.ndarray:
    """uint16 centimetres -> float32 metres, 0 where invalid (sky, zero, >= max_depth)."""
    raw = np.asarray(raw)
    depth = raw.astype(np.float32) / 100.0
    depth[(raw == SKY) | ~(depth > MIN_DEPTH) | ~(depth < max_depth)] = 0.0
    return depth


def kb_crop(array: np.ndarray) -> np.ndarray:
    """KITTI benchmark crop: the bottom 352 rows and the centred 1216 columns."""
    h, w = array.shape[:2]
    if h < KB_H or w < KB_W:
        raise ValueError(f"image {w}x{h} is smaller than the KITTI benchmark crop {KB_W}x{KB_H}")
    top, left = h - KB_H, (w - KB_W) // 2
    return array[top : top + KB_H, left : left + KB_W]


def _split(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenes", default=None, help=f"comma-separated (default: {','.join(SCENES)})")
    p.add_argument("--variations", default=None, help=f"comma-separated (default: {','.join(VARIATIONS)})")
    p.add_argument("--cameras", default=None, help=f"comma-separated (default: {','.join(CAMERAS)})")
    p.add_argument("--kb_crop", action="store_true", help="crop to 352x1216 (KITTI benchmark crop)")
    p.add_argument("--depth_format", default="npy", choices=["npy", "png"],
                   help="npy: float32 metres; png: uint16 centimetres")
    p.add_argument("--max_depth", type=float, default=MAX_DEPTH, help="depths at or beyond this are invalid (0)")


def convert_frame(sample: Sample, crop: bool, depth_format: str, max_depth: float) -> dict:
    rgb_path, depth_path = sample.item
    if not depth_path.exists():
        raise FileNotFoundError(2, "No such file", str(depth_path))
    with Image.open(depth_path) as im:
        raw = np.asarray(im)
    if raw.ndim != 2:
        raise ValueError(f"{depth_path}: expected a single-channel uint16 PNG, got shape {raw.shape}")
    with Image.open(rgb_path) as im:
        size = im.size
        rgb = np.asarray(im.convert("RGB")) if crop else None
    if size != (raw.shape[1], raw.shape[0]):
        raise ValueError(f"rgb is {size[0]}x{size[1]} but depth is {raw.shape[1]}x{raw.shape[0]}")
    depth = decode_depth(raw, max_depth)
    if crop:
        depth, rgb = kb_crop(depth), np.ascontiguousarray(kb_crop(rgb))
    out: dict = {"rgb": rgb if crop else rgb_path}
    if depth_format == "png":
        out["depth"] = np.round(depth / DEPTH_PNG_SCALE).astype(np.uint16)
    else:
        out["depth"] = depth
    return out


def _root(src: Path, name: str) -> Path:
    return src / name if (src / name).is_dir() else src


def run(args: argparse.Namespace) -> Counts:
    src = Path(args.src)
    rgb_root, depth_root = _root(src, "rgb"), _root(src, "depth")
    outputs = {"rgb": ".png" if args.kb_crop else ".jpg", "depth": f".{args.depth_format}"}
    samples, missing = [], []
    for scene in _split(args.scenes, SCENES):
        for var in _split(args.variations, VARIATIONS):
            for cam in _split(args.cameras, CAMERAS):
                folder = rgb_root / scene / var / "frames" / "rgb" / cam
                if not folder.is_dir():
                    missing.append(f"{scene}/{var}/{cam}")
                    continue
                for rgb_path in sorted(folder.glob("rgb_*.jpg")):
                    frame = rgb_path.stem[len("rgb_"):]
                    depth_path = depth_root / scene / var / "frames" / "depth" / cam / f"depth_{frame}.png"
                    samples.append(Sample(rel=f"{scene}/{var}/{cam}/{frame}", group=f"{scene}/{var}",
                                          outputs=outputs, item=(rgb_path, depth_path)))
    if not samples:
        raise SystemExit(f"{src}: no frames found; expected rgb/SceneXX/<variation>/frames/rgb/Camera_k/rgb_NNNNN.jpg")
    settings = {"kb_crop": args.kb_crop, "depth_format": args.depth_format, "max_depth": args.max_depth}
    meta = {"modalities": ["depth"], "depth_kind": "metric", "min_depth": MIN_DEPTH, "max_depth": args.max_depth}
    if args.depth_format == "png":
        meta["depth_png_scale"] = DEPTH_PNG_SCALE
    counts = Counts()
    if missing:
        counts.notes["camera folders not under --src (not converted)"] = (
            f"{len(missing)} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    convert = functools.partial(convert_frame, crop=args.kb_crop, depth_format=args.depth_format,
                                max_depth=args.max_depth)
    folder = PlainFolder(args.dst, "vkitti", settings, meta)
    return run_conversion("vkitti", folder, samples, convert, workers=args.workers, counts=counts)
