"""P3M-500-NP matting (docs/protocols.md, "Matting (P3M-500-NP)")."""


from __future__ import annotations


from pathlib import PurePosixPath


import numpy as np


from .base import BenchmarkSample, _ImageFolderBenchmark
from .storage import decode_image


class P3M500NP(_ImageFolderBenchmark):
    """P3M-500-NP: original_image/<stem>.jpg, mask/<stem>.png (alpha /255, channel 0),
    trimap/<stem>.png (channel 0). P3M-500-P's blurred_image/ is read the same way."""

    name, title, task = "p3m", "P3M-500-NP", "matting"
    default_paths = ("P3M-500-NP", "validation/P3M-500-NP", "P3M-10k/validation/P3M-500-NP")
    layout = "original_image/<stem>.jpg + mask/<stem>.png + trimap/<stem>.png"
    image_dirs = ("original_image", "blurred_image")
    gt_dir = "mask"
    crop = None

    def _load(self, entry):
        rgb = self._rgb(entry.rgb)
        alpha = decode_image(self.source.read(entry.gt))
        alpha = (alpha[:, :, 0] if alpha.ndim > 2 else alpha) / 255.0
        trimap_rel = f"trimap/{PurePosixPath(entry.rgb).stem}.png"
        trimap = decode_image(self.source.read(trimap_rel))
        trimap = trimap[:, :, 0] if trimap.ndim > 2 else trimap
        for what, arr in (("mask", alpha), ("trimap", trimap)):
            if arr.shape != rgb.shape[:2]:
                raise ValueError(f"{what} is {arr.shape}, image is {rgb.shape[:2]}")
        return BenchmarkSample(entry.rgb, rgb, alpha.astype(np.float64), np.ones(alpha.shape, bool), trimap)

    def protocol(self):
        return {**super().protocol(), "resolution": "original", "valid_mask": "whole image"}
