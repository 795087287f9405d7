"""Surface normals (docs/protocols.md, "Normal benchmarks and metrics"): one reader, `NormalBenchmark`, for the
five sets of the paper's Table 2, which share one layout and differ only in where they live and their
processing resolution."""


from __future__ import annotations


import numpy as np


from .base import Benchmark, BenchmarkSample, Entry
from .storage import IMAGE_EXTS, decode_npy


class NormalBenchmark(Benchmark):
    """``<stem>_normal.npy`` (float HxWx3 unit vectors, zero = invalid) next to ``<stem>_img.png``
    (NYU, ScanNet, iBims, OASIS) or ``<stem>.png`` (DIODE). Camera frame x right, y up, z toward
    the camera, as stored; nothing is flipped or rescaled."""

    task = "normal"
    layout = "<stem>_img.png (or <stem>.png) + <stem>_normal.npy (HxWx3)"

    def _discover(self, files):
        fileset = set(files)
        out = []
        for f in files:
            if f.endswith("_normal.npy"):
                base = f[: -len("_normal.npy")]
                for cand in [f"{base}_img{ext}" for ext in IMAGE_EXTS] + [f"{base}{ext}" for ext in IMAGE_EXTS]:
                    if cand in fileset:
                        out.append(Entry(cand, f))
                        break
        return sorted(out, key=lambda e: e.rgb)

    def _load(self, entry):
        rgb = self._rgb(entry.rgb)
        n = np.asarray(decode_npy(self.source.read(entry.gt)), dtype=np.float32)
        if n.ndim == 3 and n.shape[0] == 3 and n.shape[-1] != 3:
            n = n.transpose(1, 2, 0)
        if n.shape != rgb.shape[:2] + (3,):
            raise ValueError(f"normals {entry.gt} are {n.shape}, expected {rgb.shape[:2] + (3,)}")
        n = np.ascontiguousarray(n)
        valid = np.linalg.norm(n, axis=-1) > 0
        return BenchmarkSample(entry.rgb, rgb, n, valid)

    def protocol(self):
        return {**super().protocol(), "valid_mask": "||n_gt|| > 0"}


class NYUv2Normals(NormalBenchmark):
    name, title = "nyu_normal", "NYUv2"
    default_paths = ("nyuv2/test",)
    protocol_processing_res = 640


class ScanNetNormals(NormalBenchmark):
    name, title = "scannet_normal", "ScanNet"
    default_paths = ("scannet",)
    protocol_processing_res = 640


class IBims(NormalBenchmark):
    name, title = "ibims", "iBims-1"
    default_paths = ("ibims/ibims",)
    protocol_processing_res = 640


class DIODENormals(NormalBenchmark):
    name, title = "diode_normal", "DIODE"
    default_paths = ("diode/val",)
    protocol_processing_res = 768


class OASIS(NormalBenchmark):
    name, title = "oasis", "OASIS"
    default_paths = ("oasis/val",)
    protocol_processing_res = 768
