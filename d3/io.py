"""Reading images the way users' files really are, and writing outputs so that nothing half-written ever exists."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An input file is not a readable image; the message names the file and the reason (also as attributes)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def find_images(root: str | Path) -> list[Path]:
    """Image files under a folder (recursively, sorted), or the file itself."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def to_uint8_rgb(img: Image.Image, file_format: str | None = None) -> np.ndarray:
    """An opened Pillow image of any mode (16-bit grey, float, CMYK, palette, alpha, ...) as (H, W, 3) uint8 RGB;
    shared by `load_rgb` and `D3Pipeline` so files and in-memory images convert the same way."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # PNG has no 32-bit integer grey: its mode "I" (older Pillow) is 16-bit data, however dark the picture.
        sixteen = img.mode.startswith("I;16") or file_format == "PNG" or arr.max() > 255
        gray = np.clip(np.round(arr / (65535.0 if sixteen else 255.0) * 255.0), 0, 255).astype(np.uint8)
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
    if img.mode != "RGB":  # CMYK, YCbCr, grey, palette, 48-bit RGB (read by Pillow as 8-bit RGB)
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # one copy: a 24-megapixel photo is 72 MB per copy


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block does not make the pixels unreadable
        return 1


def load_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) with EXIF orientation applied; 16-bit, grayscale, palette, CMYK and alpha images converted.

    Raises `ImageReadError` (path and reason) for anything that is not a complete, decodable image: a truncated
    file, an empty one, a text file with an image extension.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not halfway through a batch
            file_format = img.format
            if _exif_orientation(img) not in (0, 1):
                img = ImageOps.exif_transpose(img)
            arr = to_uint8_rgb(img, file_format)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image") from None
    except Exception as err:  # PIL raises many types for bad files; all mean "not a readable image"
        if path.is_file() and path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageReadError(path, f"not a readable image ({reason})") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(path, f"unexpected image shape {arr.shape}")
    return arr


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary name in the destination folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique, and ending in .tmp (never taken for an input image). Not mkstemp: the file is created by
    # `write` with the usual permissions (mkstemp's are owner-only, and the rename would keep them).
    tmp_path = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """A plain .npy (no pickled objects), written atomically."""
    array = np.ascontiguousarray(array)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """uint8 (H,W), (H,W,3), (H,W,4) or uint16 (H,W) as a lossless PNG, written atomically."""
    array = np.ascontiguousarray(array)
    if not (array.dtype == np.uint8 and (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (3, 4))
            or array.dtype == np.uint16 and array.ndim == 2):
        raise ValueError(f"{path}: cannot save {array.dtype} {array.shape} as a PNG "
                         "(uint8 grey/RGB/RGBA or uint16 grey expected)")
    image = Image.fromarray(array)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def copy_file(src: str | Path, path: str | Path) -> Path:
    """A byte-for-byte copy of `src` (e.g. an original JPEG kept as it is), written atomically."""
    return atomic_write(path, lambda tmp: shutil.copyfile(src, tmp))
