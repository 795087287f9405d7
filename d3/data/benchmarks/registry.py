"""The benchmarks by name, the paper's table columns and `get_benchmark`."""


from __future__ import annotations


import os


from .base import Benchmark
from .diode import DIODE
from .eth3d import ETH3D
from .folder import SegmentationFolder
from .kitti import KITTI
from .normals import OASIS, DIODENormals, IBims, NYUv2Normals, ScanNetNormals
from .nyuv2 import NYUv2
from .p3m import P3M500NP
from .scannet import ScanNet
from .synthetic_depth import SyntheticDepth


BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (NYUv2, KITTI, ETH3D, ScanNet, DIODE, SyntheticDepth,
                              NYUv2Normals, ScanNetNormals, IBims, DIODENormals, OASIS,
                              P3M500NP, SegmentationFolder)
}
# The column order of the paper's Tables 1 and 2.
DEPTH_TABLE: tuple[str, ...] = ("kitti", "nyu", "scannet", "diode", "eth3d")
NORMAL_TABLE: tuple[str, ...] = ("nyu_normal", "scannet_normal", "ibims", "diode_normal", "oasis")
GROUPS: dict[str, tuple[str, ...]] = {"all_depth": DEPTH_TABLE, "all_normal": NORMAL_TABLE}


def get_benchmark(name: str, root: os.PathLike, split: os.PathLike | None = None, **kwargs) -> Benchmark:
    """Reader for ``name`` (a key of :data:`BENCHMARKS`)."""
    try:
        cls = BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BENCHMARKS)}") from None
    return cls(root, split, **kwargs)
