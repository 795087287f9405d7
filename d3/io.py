"""Reading images the way users' files really are, and writing outputs so that nothing half-written ever exists."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An input file is not a readable image; the message names the file and the reason."""


def find_images(root: str | Path) -> list[Path]:
    """Image files under a folder (recursively, sorted), or the file itself."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: a transparent background is not black scenery.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) with EXIF orientation applied; 16-bit, grayscale, palette, CMYK and alpha images converted."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _to_uint8_rgb(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as err:  # PIL raises many types for bad files; all mean "not a readable image"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageReadError(f"{path}: not a readable image ({reason})") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{path}: unexpected image shape {arr.shape}")
    return arr


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary name in the destination folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """uint8 (H,W), (H,W,3), (H,W,4) or uint16 (H,W) PNG."""
    if array.dtype == np.uint16:
        if array.ndim != 2:
            raise ValueError("16-bit PNGs are written single-channel")
        img = Image.fromarray(array)
    else:
        img = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
