"""DIODE depth (docs/protocols.md, "Depth benchmarks")."""


from __future__ import annotations


import numpy as np


from .base import DepthBenchmark, Entry
from .storage import decode_npy


class DIODE(DepthBenchmark):
    """DIODE val (indoors + outdoor): depth ``_depth.npy`` metres; the valid mask is the
    ``_depth_mask.npy`` file only (no range test); [0.6, 350] only clips predictions."""

    name, title = "diode", "DIODE"
    default_paths = ("diode/diode_val.tar", "diode/diode_val", "diode/val", "diode")
    layout = "{indoors,outdoor}/scene_*/scan_*/X.png + X_depth.npy + X_depth_mask.npy"
    min_depth, max_depth = 0.6, 350.0
    protocol_processing_res = 640
    valid_mask_rule = "mask file only"

    def _discover(self, files):
        fileset = set(files)
        out = []
        for f in files:
            if f.endswith(".png"):
                stem = f[:-4]
                if f"{stem}_depth.npy" in fileset and f"{stem}_depth_mask.npy" in fileset:
                    out.append(Entry(f, f"{stem}_depth.npy", f"{stem}_depth_mask.npy"))
        return out

    def _parse_split(self, lines):
        entries = super()._parse_split(lines)
        for e in entries:
            if e.extra is None:
                raise ValueError(f"{self.split}: DIODE lines need 3 columns (rgb depth mask), got {e.rgb}")
        return entries

    def _decode_depth(self, entry):
        return decode_npy(self.source.read(entry.gt))

    def _valid(self, depth, entry):
        mask = np.asarray(decode_npy(self.source.read(entry.extra))).squeeze().astype(bool)
        if mask.shape != depth.shape:
            raise ValueError(f"mask {entry.extra} is {mask.shape}, depth is {depth.shape}")
        return mask
