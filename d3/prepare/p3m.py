"""P3M-10k train -> plain folder with rgb and alpha (docs/protocols.md, "Training data").

Raw layout: ``P3M-10k/train/blurred_image/<stem>.jpg`` (9 421 face-blurred portraits) and
``P3M-10k/train/mask/<stem>.png`` (alpha 0..255). ``--src`` may name the folder above ``P3M-10k``,
``P3M-10k`` itself or its ``train`` folder. The JPEG is copied byte for byte; the mask is decoded
(greyscale, or the first channel of an RGB(A) mask) and written as an 8-bit greyscale PNG, so the
values are unchanged. P3M-Net's closed-form fg/bg are not needed and not converted.

Output REL: ``<stem>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from .common import Counts, PlainFolder, Sample, run_conversion

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def find_train_dir(src: Path) -> Path:
    for cand in (src, src / "train", src / "P3M-10k" / "train"):
        if (cand / "blurred_image").is_dir() and (cand / "mask").is_dir():
            return cand
    raise SystemExit(f"{src}: expected P3M-10k/train/blurred_image/*.jpg and train/mask/*.png under it")


def read_alpha(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            return np.asarray(im)[..., 0].copy()
        if im.mode in ("L", "P", "1", "LA"):
            return np.asarray(im.convert("L"))
        array = np.asarray(im)  # 16-bit or float masks: rescale to 0..255
        top = 65535.0 if array.dtype == np.uint16 else 255.0
        return np.clip(np.round(array.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)


def convert_pair(sample: Sample) -> dict:
    img_path, mask_path = sample.item
    if not mask_path.exists():
        raise FileNotFoundError(2, "No such file", str(mask_path))
    alpha = read_alpha(mask_path)
    with Image.open(img_path) as im:
        size = im.size
    if size != (alpha.shape[1], alpha.shape[0]):
        raise ValueError(f"image is {size[0]}x{size[1]} but the mask is {alpha.shape[1]}x{alpha.shape[0]}")
    return {"rgb": img_path, "alpha": alpha}


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def run(args: argparse.Namespace) -> Counts:
    train = find_train_dir(Path(args.src))
    samples = []
    for img in sorted((train / "blurred_image").iterdir()):
        if img.suffix.lower() not in IMAGE_EXTS or img.name.startswith("."):
            continue
        samples.append(Sample(rel=img.stem, group="train", outputs={"rgb": img.suffix.lower(), "alpha": ".png"},
                              item=(img, train / "mask" / f"{img.stem}.png")))
    if not samples:
        raise SystemExit(f"{train / 'blurred_image'}: no images found")
    folder = PlainFolder(args.dst, "p3m", {}, {"modalities": ["alpha"]})
    return run_conversion("p3m", folder, samples, convert_pair, workers=args.workers)
