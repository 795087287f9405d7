"""A domain-specific segmentation folder (docs/protocols.md, "Few-shot segmentation")."""


from __future__ import annotations


from collections.abc import Sequence

import numpy as np

from ... import layouts
from .base import BenchmarkSample, Entry, _ImageFolderBenchmark
from .storage import decode_image, decode_npy


class SegmentationFolder(_ImageFolderBenchmark):
    """Any domain-specific binary task, in every image/mask layout training reads (`d3.layouts`: images/ + masks/,
    image/ + mask/, rgb/ + alpha/, ...; masks .png/.jpg, > 127 = foreground, colour masks: any channel > 127; or
    .npy in [0, 1])."""

    name, title, task = "folder", "folder", "segmentation"
    layout = (f"an image folder ({layouts.folder_names(layouts.IMAGE_DIRS)}) and a mask folder "
              f"({layouts.folder_names(layouts.TARGET_DIRS['alpha'])}), paired by file name")
    image_dirs = layouts.IMAGE_DIRS

    def _pairs(self, files: Sequence[str]) -> tuple[str, dict[str, str | None]]:
        image_dir, mask_dir, pairs = layouts.pair_files(files, "alpha")
        if image_dir is None or mask_dir is None:
            raise FileNotFoundError(f"{self.name}: {self.root} has no " + " and no ".join(
                f"{what} folder ({layouts.folder_names(dirs)})" for what, dirs, d in (
                    ("image", layouts.IMAGE_DIRS, image_dir), ("mask", layouts.TARGET_DIRS["alpha"], mask_dir))
                if d is None))
        self.gt_dir = mask_dir
        return image_dir, dict(pairs)

    def _discover(self, files):
        _, pairs = self._pairs(files)
        for rgb, gt in pairs.items():
            if gt is None:
                raise FileNotFoundError(f"{self.name}: {self.root / rgb} has no mask in {self.gt_dir}/")
        return [Entry(rgb, gt) for rgb, gt in pairs.items()]

    def _parse_split(self, lines):
        image_dir, pairs = self._pairs(self.source.files())
        out = []
        for ln in lines:
            rgb = ln[0] if "/" in ln[0] else f"{image_dir}/{ln[0]}"
            if pairs.get(rgb) is None:
                raise FileNotFoundError(f"{self.name}: split entry {ln[0]} has no mask in {self.gt_dir}/ of "
                                        f"{self.root}")
            out.append(Entry(rgb, pairs[rgb]))
        return out

    def _load(self, entry):
        rgb = self._rgb(entry.rgb)
        if entry.gt.endswith(".npy"):  # float in [0, 1], as training reads it
            m = decode_npy(self.source.read(entry.gt)).astype(np.float64) * 255.0
        else:
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
