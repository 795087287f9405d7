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
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
from PIL import Image

from .. import layouts

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# Storage: a folder or an uncompressed tar
# ----------------------------------------------------------------------------------------------

class Source:
    """Read-only view of a dataset root as relative POSIX paths."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def files(self) -> list[str]:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open (an archive); reading afterwards is an error."""

    @staticmethod
    def open(path: Path) -> Source:
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise ValueError(f"{path}: expected a dataset folder or an uncompressed .tar archive")
            return TarSource(path)
        return FolderSource(path)


class FolderSource(Source):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        if self._files is None:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = Path(dirpath).relative_to(self.path).as_posix()
                for f in filenames:
                    if not f.startswith("."):
                        out.append(f if rel_dir == "." else f"{rel_dir}/{f}")
            self._files = sorted(out)
        return self._files

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path / rel}: file missing") from None


class TarSource(Source):
    """Members are indexed once; names are normalised without the leading ``./``. The archive stays open until
    ``close()`` or until the source is garbage-collected (no file is left to the interpreter to close)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tar = tarfile.open(path, "r:*")  # distributed uncompressed; a compressed copy works, slowly
        self._closer = weakref.finalize(self, self._tar.close)  # runs once: at close() or at collection
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in self._tar.getmembers():
            if m.isfile():
                name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
                self._members[name] = m

    def files(self) -> list[str]:
        return sorted(self._members)

    def exists(self, rel: str) -> bool:
        return rel in self._members

    def read(self, rel: str) -> bytes:
        member = self._members.get(rel)
        if member is None:
            raise FileNotFoundError(f"{self.path}: member ./{rel} missing from the archive")
        f = self._tar.extractfile(member)
        assert f is not None
        return f.read()

    def close(self) -> None:
        self._closer()


# ----------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """Any PIL-readable image as a NumPy array, unchanged (uint8, uint16/int32 for 16-bit PNGs)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def decode_rgb(data: bytes) -> np.ndarray:
    """uint8 HxWx3 (grey, palette and RGBA images are converted; alpha is dropped)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()


def decode_png_unit(data: bytes) -> np.ndarray:
    """A grey-level PNG as float64 in [0, 1]: 8-bit /255, 16-bit /65535, colour -> channel mean."""
    arr = decode_image(data)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64).mean(-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.int64, np.uint32):
        return arr.astype(np.float64) / 65535.0
    return arr.astype(np.float64)


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------------------------
# Samples and the reader base class
# ----------------------------------------------------------------------------------------------

@dataclass
class BenchmarkSample:
    name: str                        # RGB path relative to the data root
    rgb: np.ndarray                  # uint8 HxWx3, after the dataset's crop
    gt: np.ndarray                   # depth m (f32 HxW) | normals (f32 HxWx3) | alpha (f64 HxW) | mask (bool HxW)
    valid: np.ndarray                # bool HxW
    trimap: np.ndarray | None = None  # P3M only, uint8 {0, 128, 255}


@dataclass
class Entry:
    rgb: str
    gt: str
    extra: str | None = None


class Benchmark:
    """Base reader. Subclasses set the class attributes and implement ``_discover``/``_load``."""

    name: ClassVar[str]
    title: ClassVar[str]                       # column title in the paper's tables
    task: ClassVar[str]                        # depth | normal | matting | segmentation
    default_paths: ClassVar[tuple[str, ...]] = ()  # where the set lives under a base data dir
    layout: ClassVar[str] = ""                 # expected layout, for error messages
    protocol_processing_res: ClassVar[int | None] = None  # Marigold's inference setting
    crop: ClassVar[str | None] = None

    def __init__(self, root: os.PathLike, split: os.PathLike | None = None) -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{self.name}: data root {root} does not exist")
        self.root = self.resolve_root(root)
        self.source = Source.open(self.root)
        self.split = Path(split) if split is not None else None
        self.skipped_without_gt = 0
        if self.split is not None:
            lines = [ln.split() for ln in self.split.read_text().splitlines()]
            self.entries = self._parse_split([ln for ln in lines if ln])
        else:
            self.entries = self._discover(self.source.files())
        if not self.entries:
            raise FileNotFoundError(
                f"{self.name}: no samples found in {self.root}"
                + (f" for split {self.split}" if self.split else "")
                + f"; expected {self.layout}")

    @classmethod
    def resolve_root(cls, root: Path) -> Path:
        """The root itself if it is an archive, else the first usual sub-path present, else root."""
        if root.is_dir():
            for rel in cls.default_paths:
                if (root / rel).exists():
                    return root / rel
        return root

    @classmethod
    def present_in(cls, base: Path) -> Path | None:
        """The usual location of this set under ``base`` if there is one (for --dataset all_*)."""
        for rel in cls.default_paths:
            if (base / rel).exists():
                return base / rel
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        """Close the archive a ``.tar`` data root is read from (it is also closed when the reader is collected)."""
        self.source.close()

    def __getitem__(self, index: int) -> BenchmarkSample:
        entry = self.entries[index]
        try:
            return self._load(entry)
        except (OSError, ValueError) as e:
            raise type(e)(f"{self.name} sample {entry.rgb}: {e}") from e

    def protocol(self) -> dict[str, object]:
        return {"crop": self.crop, "protocol_processing_res": self.protocol_processing_res}

    # -- to implement ---------------------------------------------------------------------------
    def _discover(self, files: Sequence[str]) -> list[Entry]:
        raise NotImplementedError

    def _parse_split(self, lines: list[list[str]]) -> list[Entry]:
        return [Entry(ln[0], ln[1] if len(ln) > 1 else "", ln[2] if len(ln) > 2 else None) for ln in lines]

    def _load(self, entry: Entry) -> BenchmarkSample:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------
    def _rgb(self, rel: str) -> np.ndarray:
        return decode_rgb(self.source.read(rel))


def _pair_by_regex(files: Sequence[str], pattern: str, gt_of: Callable[[re.Match], str],
                   fileset: set | None = None) -> tuple[list[Entry], int]:
    """Entries for every file matching ``pattern`` whose GT ``gt_of(match)`` exists."""
    rx = re.compile(pattern)
    fileset = fileset if fileset is not None else set(files)
    out, missing = [], 0
    for f in files:
        m = rx.fullmatch(f)
        if m:
            gt = gt_of(m)
            if gt in fileset:
                out.append(Entry(f, gt))
            else:
                missing += 1
    return out, missing


# ----------------------------------------------------------------------------------------------
# Depth (docs/protocols.md, "Depth benchmarks")
# ----------------------------------------------------------------------------------------------

class DepthBenchmark(Benchmark):
    task = "depth"
    min_depth: ClassVar[float]
    max_depth: ClassVar[float]
    alignment: ClassVar[str] = "least_square"
    alignment_max_res: ClassVar[int | None] = None
    pred_name_mode: ClassVar[str] = "id"  # Marigold's DepthFileNameMode for the prediction names
    valid_mask_rule: ClassVar[str] = ""

    def _decode_depth(self, entry: Entry) -> np.ndarray:
        raise NotImplementedError

    def _crop(self, arr: np.ndarray) -> np.ndarray:
        return arr

    def _eval_box(self, h: int, w: int) -> tuple[slice, slice] | None:
        return None

    def _valid(self, depth: np.ndarray, entry: Entry) -> np.ndarray:
        valid = (depth > self.min_depth) & (depth < self.max_depth)
        box = self._eval_box(*depth.shape)
        if box is not None:
            inside = np.zeros_like(valid)
            inside[box] = True
            valid &= inside
        return valid

    def _load(self, entry: Entry) -> BenchmarkSample:
        rgb = self._crop(self._rgb(entry.rgb))
        # Marigold: decode (float64 maths) -> float32 tensor -> crop; masks on the float32 values.
        depth = self._crop(np.asarray(self._decode_depth(entry)).squeeze().astype(np.float32))
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"GT {entry.gt} is {depth.shape}, RGB is {rgb.shape[:2]} (after cropping)")
        return BenchmarkSample(entry.rgb, rgb, depth, self._valid(depth, entry))

    def protocol(self) -> dict[str, object]:
        return {**super().protocol(), "min_depth": self.min_depth, "max_depth": self.max_depth,
                "valid_mask": self.valid_mask_rule, "alignment": self.alignment,
                "alignment_max_res": self.alignment_max_res}

    def _png_depth(self, rel: str, divisor: float) -> np.ndarray:
        return decode_image(self.source.read(rel)) / divisor


class NYUv2(DepthBenchmark):
    """NYUv2 labeled, Eigen test split: uint16 mm PNG, 1e-3 < d < 10, Eigen box [45:471, 41:601]."""

    name, title = "nyu", "NYU"
    default_paths = ("nyuv2/nyu_labeled_extracted.tar", "nyuv2/nyu_labeled_extracted", "nyuv2")
    layout = "test/<scene>/rgb_NNNN.png + depth_NNNN.png (uint16 mm), folder or nyu_labeled_extracted.tar"
    min_depth, max_depth = 1e-3, 10.0
    protocol_processing_res = 0
    crop = "eigen valid box rows 45..470, cols 41..600"
    valid_mask_rule = "1e-3 < d < 10 & eigen box [45:471, 41:601]"
    pred_name_mode = "rgb_id"

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"(.*/)?rgb_(\d+)\.png", lambda m: f"{m[1] or ''}depth_{m[2]}.png")
        test = [e for e in entries if e.rgb.startswith("test/")]
        return test or entries  # the archive also holds train/: evaluate test/ when present

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 1000.0)

    def _eval_box(self, h, w):
        return slice(45, 471), slice(41, 601)


class KITTI(DepthBenchmark):
    """KITTI Eigen test split with depth-completion GT: uint16/256, KB crop, Eigen box."""

    name, title = "kitti", "KITTI"
    default_paths = ("kitti/kitti_eigen_split_test.tar", "kitti/kitti_eigen_split_test", "kitti")
    layout = ("YYYY_MM_DD/<drive>_sync/image_02/data/<frame>.png + "
              "<drive>_sync/proj_depth/groundtruth/image_02/<frame>.png (uint16 /256)")
    min_depth, max_depth = 1e-5, 80.0
    protocol_processing_res = 0
    crop = "KB crop 352x1216 (bottom, centred) on RGB and GT; eigen valid box on the cropped frame"
    valid_mask_rule = "1e-5 < d < 80 & eigen box (fractions of the KB-cropped frame)"
    KB_H, KB_W = 352, 1216

    def _discover(self, files):
        entries, missing = _pair_by_regex(
            files, r"(.*/)?\d{4}_\d{2}_\d{2}/([^/]+_sync)/image_02/data/(\d+)\.png",
            lambda m: f"{m[1] or ''}{m[2]}/proj_depth/groundtruth/image_02/{m[3]}.png")
        self.skipped_without_gt = missing
        return entries

    def _parse_split(self, lines):
        entries = super()._parse_split(lines)
        kept = [e for e in entries if e.gt != "None"]  # the 45 Eigen frames without GT
        self.skipped_without_gt = len(entries) - len(kept)
        return kept

    def _crop(self, arr):
        h, w = arr.shape[:2]
        if h < self.KB_H or w < self.KB_W:
            raise ValueError(f"frame {h}x{w} is smaller than the KB crop {self.KB_H}x{self.KB_W}")
        top, left = int(h - self.KB_H), int((w - self.KB_W) / 2)
        return arr[top:top + self.KB_H, left:left + self.KB_W]

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 256.0)

    def _eval_box(self, h, w):
        return (slice(int(0.3324324 * h), int(0.91351351 * h)),
                slice(int(0.0359477 * w), int(0.96405229 * w)))


class ETH3D(DepthBenchmark):
    """ETH3D DSLR: the depth ``.JPG`` is a headerless float32 buffer (+inf = missing -> 0).

    ``depth_shape`` is the buffer's (H, W): the real 4032x6048 by default; ``None`` takes the RGB
    image's size (tests use small fixtures that way)."""

    name, title = "eth3d", "ETH3D"
    default_paths = ("eth3d/eth3d.tar", "eth3d/eth3d", "eth3d")
    layout = ("rgb/<scene>/images/dslr_images/X.JPG + "
              "depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/X.JPG (raw float32)")
    min_depth, max_depth = 1e-5, math.inf
    protocol_processing_res = 756
    alignment_max_res = 1024
    valid_mask_rule = "d > 1e-5 (finite)"
    HEIGHT, WIDTH = 4032, 6048

    def __init__(self, root, split=None, depth_shape: tuple[int, int] | None = (HEIGHT, WIDTH)) -> None:
        self.depth_shape = depth_shape
        super().__init__(root, split)

    def _discover(self, files):
        entries, _ = _pair_by_regex(
            files, r"(.*/)?rgb/([^/]+)/images/dslr_images/([^/]+\.(?i:jpg))",
            lambda m: f"{m[1] or ''}depth/{m[2]}_dslr_depth/{m[2]}/ground_truth_depth/dslr_images/{m[3]}")
        return entries

    def _decode_depth(self, entry):
        buf = np.frombuffer(self.source.read(entry.gt), dtype="<f4").copy()
        buf[buf == np.inf] = 0.0
        shape = self.depth_shape
        if shape is None:
            with Image.open(io.BytesIO(self.source.read(entry.rgb))) as im:
                shape = (im.height, im.width)
        if buf.size != shape[0] * shape[1]:
            raise ValueError(f"depth buffer {entry.gt} has {buf.size} float32 values, expected "
                             f"{shape[0]}x{shape[1]}")
        return buf.reshape(shape)


class ScanNet(DepthBenchmark):
    """ScanNet 800 sampled validation frames: uint16 mm PNG, 1e-3 < d < 10, no crop."""

    name, title = "scannet", "ScanNet"
    default_paths = ("scannet/scannet_val_sampled_800_1.tar", "scannet/scannet_val_sampled_800_1", "scannet")
    layout = "sceneXXXX_YY/color/NNNNNN.jpg + sceneXXXX_YY/depth/NNNNNN.png (uint16 mm)"
    min_depth, max_depth = 1e-3, 10.0
    protocol_processing_res = 0
    valid_mask_rule = "1e-3 < d < 10"

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"(.*/)?([^/]+)/color/(\d+)\.jpg",
                                    lambda m: f"{m[1] or ''}{m[2]}/depth/{m[3]}.png")
        return entries

    def _decode_depth(self, entry):
        return self._png_depth(entry.gt, 1000.0)


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


# ----------------------------------------------------------------------------------------------
# Surface normals (docs/protocols.md, "Normal benchmarks and metrics")
# ----------------------------------------------------------------------------------------------

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


class SyntheticDepth(DepthBenchmark):
    """A folder written by ``python -m d3.data.synthetic`` (d3's plain training-folder layout): rgb/<name>.png +
    depth/<name>.npy (float32 metres, 0 = invalid). Valid: min_depth < d < max_depth from its d3_dataset.json
    (default 0 < d < inf); no crop; least-squares alignment, clipped to that range. For held-out scenes of the quick
    start and the tests, not a benchmark of the paper."""

    name, title = "synthetic", "synthetic"
    layout = "rgb/<name>.png + depth/<name>.npy (metres, 0 = invalid) [+ d3_dataset.json], as d3.data.synthetic writes"
    min_depth, max_depth = 0.0, math.inf
    protocol_processing_res = 0
    valid_mask_rule = "min_depth < d < max_depth of d3_dataset.json (default 0 < d < inf)"

    def __init__(self, root, split=None) -> None:
        super().__init__(root, split)
        if self.source.exists("d3_dataset.json"):

            meta = json.loads(self.source.read("d3_dataset.json"))
            self.min_depth = float(meta.get("min_depth", self.min_depth))
            self.max_depth = float(meta.get("max_depth", self.max_depth))

    def _discover(self, files):
        entries, _ = _pair_by_regex(files, r"rgb/(.+)\.png", lambda m: f"depth/{m[1]}.npy")
        return sorted(entries, key=lambda e: e.rgb)

    def _decode_depth(self, entry):
        return decode_npy(self.source.read(entry.gt))


# ----------------------------------------------------------------------------------------------
# Matting (docs/protocols.md, "Matting (P3M-500-NP)") and domain-specific segmentation folders ("Few-shot segmentation")
# ----------------------------------------------------------------------------------------------

class _ImageFolderBenchmark(Benchmark):
    """``<image_dir>/<stem>.<ext>`` paired by stem with ``<gt_dir>/<stem>.png``; images listed
    without hidden files, sorted (P3M's ``listdir`` order, sorted)."""

    image_dirs: ClassVar[tuple[str, ...]]
    gt_dir: ClassVar[str]

    def _image_dir(self, files: Sequence[str]) -> str:
        for d in self.image_dirs:
            if any(f.startswith(d + "/") for f in files):
                return d
        return self.image_dirs[0]

    def _entry(self, rgb: str, fileset: set) -> Entry | None:
        gt = f"{self.gt_dir}/{PurePosixPath(rgb).stem}.png"
        return Entry(rgb, gt) if gt in fileset else None

    def _discover(self, files):
        d = self._image_dir(files)
        fileset = set(files)
        out = []
        for f in files:
            p = PurePosixPath(f)
            if str(p.parent) == d and p.suffix.lower() in IMAGE_EXTS:
                e = self._entry(f, fileset)
                if e is None:
                    raise FileNotFoundError(f"{self.name}: {self.root / f} has no {self.gt_dir}/{p.stem}.png")
                out.append(e)
        return out

    def _parse_split(self, lines):
        files = self.source.files()
        d = self._image_dir(files)
        fileset = set(files)
        out = []
        for ln in lines:
            rgb = ln[0] if "/" in ln[0] else f"{d}/{ln[0]}"
            e = self._entry(rgb, fileset)
            if e is None:
                raise FileNotFoundError(f"{self.name}: split entry {ln[0]} has no {self.gt_dir}/ file in {self.root}")
            out.append(e)
        return out


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
