"""The reader base classes: a sample, a split entry, `Benchmark`, and the depth and image-folder families."""


from __future__ import annotations


import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar


import numpy as np


from .storage import IMAGE_EXTS, Source, decode_image, decode_rgb


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
