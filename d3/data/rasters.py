"""Reading and resizing training rasters: exact 16-bit PNGs, depth/normal/alpha arrays from .npy, .h5 or PNG,
and the squashes to the square training size that the authors' loaders make."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class BadSampleError(RuntimeError):
    """A training sample cannot be used; the message names its file(s) and why."""


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


def read_png_exact(path: Path) -> np.ndarray:
    """An image's samples at their stored bit depth (uint16 for 16-bit colour PNGs such as normal maps).

    Pillow decodes 16-bit colour PNGs to 8 bits by keeping each sample's high byte. Decoding the same stream a second
    time with the little-endian raw mode keeps the low bytes instead (same bits per pixel, so the same un-filtering
    and de-interlacing); the two together are the exact 16-bit values.
    """
    with Image.open(path) as img:
        tile = img.tile[0] if img.format == "PNG" and len(img.tile) == 1 else None
        rawmode = tile[3] if tile is not None else None
        rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
        high = np.asarray(img)
    if rawmode not in ("RGB;16B", "RGBA;16B"):
        return high
    with Image.open(path) as img:
        img.tile = [(tile[0], tile[1], tile[2], rawmode.replace(";16B", ";16L"))]
        low = np.asarray(img)
    return high.astype(np.uint16) << 8 | low


def png_to_normals(values: np.ndarray) -> np.ndarray:
    """(n+1)/2 colours of a 16-bit (or 8-bit) PNG -> normals in [-1, 1]; black pixels (all 0) are invalid (DSINE's
    convention; (0,0,0) is no unit normal's colour). A 16-bit image always has a sample > 255 unless all black."""
    top = 65535.0 if values.max() > 255 else 255.0
    invalid = (values == 0).all(axis=-1, keepdims=True)
    return np.where(invalid, 0.0, values / top * 2 - 1).astype(np.float32)


def read_array(path: Path, *, png_scale: float = 1.0, h5_key: str = "depth") -> np.ndarray:
    """A depth/normal/alpha raster as float32 (H,W) or (H,W,C), from .npy, .h5 or an 8/16-bit PNG."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".h5":
        with h5py.File(path, "r") as f:
            if h5_key not in f:
                raise BadSampleError(f"{path}: no dataset '{h5_key}' (found {list(f.keys())})")
            arr = f[h5_key][()]
    else:
        arr = read_png_exact(path)
        arr = arr.astype(np.float64) * png_scale
    return np.asarray(arr, dtype=np.float32)


def _image_full_scale(path: Path) -> float:
    """The value of a fully opaque pixel: from the file's bit depth, not its content (a mostly empty 16-bit matte
    must not be read as 8-bit)."""
    with Image.open(path) as img:
        return 65535.0 if img.mode in ("I;16", "I;16B", "I;16L", "I") else 255.0


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, size, size) in [-1, 1]: a squash with PIL's antialiased bilinear filter on the 8-bit
    image (what the authors' torchvision Resize does on a PIL image)."""
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0 * 2 - 1


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, h, w), bilinear without antialias (the authors' F.interpolate on ground-truth rasters)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def _resize_nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    return _resize(x.float(), size, "nearest-exact")


def _resize_alpha(alpha: np.ndarray, size: int) -> np.ndarray:
    """An alpha matte squashed to size², in [0, 1]. 8-bit mattes go through PIL's bilinear filter in 8 bits, exactly
    as the authors load them; deeper ones (16-bit PNG, float .npy) are resized in float with the same filter. A matte
    already at size² is scaled and clipped the same way (PIL's resize to the same size is the identity)."""
    if alpha.dtype == np.uint8:
        if alpha.shape != (size, size):
            alpha = np.asarray(Image.fromarray(alpha).resize((size, size), Image.BILINEAR))
        return alpha.astype(np.float32) / 255.0
    if alpha.shape != (size, size):
        alpha = np.asarray(Image.fromarray(alpha.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR),
                           dtype=np.float32)
    return np.clip(alpha, 0.0, 1.0)
