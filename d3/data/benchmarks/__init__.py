"""Evaluation benchmarks: one reader per dataset, in its on-disk layout (docs/protocols.md: "Benchmark storage and
prediction files", "Depth benchmarks", "Normal benchmarks and metrics", "Matting (P3M-500-NP)").

Each reader takes a data root that is either the dataset folder, the uncompressed ``.tar`` it is
distributed as (created from inside the dataset root, members ``./<relative path>``), or a base
directory holding it under its usual name (``nyuv2/nyu_labeled_extracted.tar``, ``kitti/...``,
``P3M-500-NP`` ...; see ``default_paths``). Without a split file the samples are discovered from
the files present; ``split=`` takes a whitespace-separated filename list as distributed with
Marigold (column 0 RGB, column 1 GT, optional column 2).

A sample gives the RGB (uint8 HxWx3) after the dataset's own crop, the GT (depth in metres float32
HxW / unit normals float32 HxWx3 / alpha float64 HxW in [0, 1] / boolean mask HxW), the boolean
valid mask, the RGB path relative to the data root (the name predictions are looked up by) and, for
P3M, the trimap.

One module per reader (`nyuv2`, `kitti`, `eth3d`, `scannet`, `diode`, `normals`, `p3m`, `folder`,
`synthetic_depth`) on the base classes of `base` and the storage of `storage`; `registry` names them.
"""


from __future__ import annotations


from .base import Benchmark, BenchmarkSample, DepthBenchmark, Entry, _ImageFolderBenchmark, _pair_by_regex
from .diode import DIODE
from .eth3d import ETH3D
from .folder import SegmentationFolder
from .kitti import KITTI
from .normals import OASIS, DIODENormals, IBims, NormalBenchmark, NYUv2Normals, ScanNetNormals
from .nyuv2 import NYUv2
from .p3m import P3M500NP
from .registry import BENCHMARKS, DEPTH_TABLE, GROUPS, NORMAL_TABLE, get_benchmark
from .scannet import ScanNet
from .storage import (IMAGE_EXTS, FolderSource, Source, TarSource, decode_image, decode_npy, decode_png_unit,
                      decode_rgb)
from .synthetic_depth import SyntheticDepth


__all__ = [
    "BENCHMARKS", "DEPTH_TABLE", "DIODE", "ETH3D", "GROUPS", "IMAGE_EXTS", "KITTI", "NORMAL_TABLE", "NYUv2", "OASIS",
    "P3M500NP", "Benchmark", "BenchmarkSample", "DIODENormals", "DepthBenchmark", "Entry", "FolderSource", "IBims",
    "NYUv2Normals", "NormalBenchmark", "ScanNet", "ScanNetNormals", "SegmentationFolder", "Source", "SyntheticDepth",
    "TarSource", "_ImageFolderBenchmark", "_pair_by_regex", "decode_image", "decode_npy", "decode_png_unit",
    "decode_rgb", "get_benchmark",
]
