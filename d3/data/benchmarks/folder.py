"""A domain-specific segmentation folder (docs/protocols.md, "Few-shot segmentation")."""


from __future__ import annotations


import numpy as np


from .base import BenchmarkSample, _ImageFolderBenchmark
from .storage import decode_image


class SegmentationFolder(_ImageFolderBenchmark):
    """Any domain-specific binary task: images/<name>.<ext> + masks/<name>.png (> 127 = foreground,
    colour masks: any channel > 127)."""

    name, title, task = "folder", "folder", "segmentation"
    layout = "images/<name>.<ext> + masks/<name>.png"
    image_dirs = ("images",)
    gt_dir = "masks"

    def _load(self, entry):
        rgb = self._rgb(entry.rgb)
        m = decode_image(self.source.read(entry.gt))
        if m.dtype != np.uint8 and m.dtype != bool:
            m = (m.astype(np.float64) / 257.0)  # 16-bit masks on the 8-bit scale
        if m.ndim == 3:  # colour masks: any colour channel; grey + alpha: the grey channel
            m = m[..., :3].max(-1) if m.shape[-1] >= 3 else m[..., 0]
        fg = m > 127
        if fg.shape != rgb.shape[:2]:
            raise ValueError(f"mask {entry.gt} is {fg.shape}, image is {rgb.shape[:2]}")
        return BenchmarkSample(entry.rgb, rgb, fg, np.ones(fg.shape, bool))

    def protocol(self):
        return {**super().protocol(), "foreground": "mask > 127; prediction > 0.5",
                "aggregation": "per-image, mean over images"}
