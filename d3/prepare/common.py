"""The plain training-folder format, and the writer every converter shares.

Layout of a prepared folder (one source per folder)::

    OUT/
      d3_dataset.json        manifest (below); written first, updated at the end of every run
      rgb/<REL>.png|.jpg     8-bit RGB (or greyscale) image
      depth/<REL>.npy        float32 (H, W) depth in metres; 0 marks an invalid pixel
      depth/<REL>.png        alternative: uint16, metres = value * manifest["depth_png_scale"]; 0 = invalid
      normal/<REL>.npy       float32 or float16 (H, W, 3) unit normals in the camera frame x right, y up,
                             z towards the viewer (OpenGL / Marigold; a fronto-parallel wall is (0, 0, 1));
                             (0, 0, 0) marks an invalid pixel
      alpha/<REL>.png        uint8 (H, W) alpha matte, 0..255
      .d3_done/<group>.json  per-scene done markers (resumability only; not part of the data)

``REL`` is a POSIX relative path without extension (``ai_001_001/cam_00_fr0000``); every raster of a
sample has the size of its RGB image; ``d3.data.folders.TrainingFolder`` reads the folder. Within a
sample the RGB file is written last, and every file is written under a temporary name in its final
folder, then renamed (``d3.io.atomic_write``): a listed RGB file therefore always has all its
targets, and an interrupted run never leaves a truncated file.

Manifest keys: ``format`` ("d3-plain"), ``version``, ``source`` (hypersim | vkitti | sintel | p3m |
the pseudo-label source name), ``modalities`` (subset of depth, normal, alpha), ``num_samples``,
``settings`` (what changes the written bytes; a second run into the same folder must match them),
and where they apply ``depth_kind`` ("metric" | "relative" | "relative_inverse"), ``min_depth`` /
``max_depth`` (the valid range the training loss should use, strict inequalities),
``depth_png_scale``, ``normal_frame``, ``model``, plus ``last_run`` counts.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d3.io import copy_file, save_npy, save_png, write_bytes

FORMAT_NAME = "d3-plain"
FORMAT_VERSION = 1
MANIFEST = "d3_dataset.json"
DONE_DIR = ".d3_done"
RGB_EXTS = (".png", ".jpg", ".jpeg")
NORMAL_FRAME = "camera: x right, y up, z towards the viewer (OpenGL, as Marigold); invalid = (0,0,0)"


def write_value(path: Path, value: Path | np.ndarray) -> None:
    """Write one target: a Path is copied verbatim, an array by the file's extension (.npy or .png)."""
    path = Path(path)
    if isinstance(value, Path):
        copy_file(value, path)
    elif path.suffix == ".npy":
        save_npy(path, value)
    else:
        save_png(path, value)


# --------------------------------------------------------------------------------------------
# Listing


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; expected a folder written by d3.prepare or d3.pseudo_label") \
            from None


def list_samples(root: Path) -> list[str]:
    """All RELs of a folder (sorted), found through their RGB files."""
    base = Path(root) / "rgb"
    rels = []
    for dirpath, _, files in os.walk(base):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in RGB_EXTS and not name.startswith("."):
                rels.append(Path(dirpath, stem).relative_to(base).as_posix())
    return sorted(rels)


# --------------------------------------------------------------------------------------------
# The folder and its manifest


class PlainFolder:
    """An output folder of one source; refuses to mix settings that change the written bytes."""

    def __init__(self, root: Path, source: str, settings: dict, meta: dict):
        self.root = Path(root)
        self.source = source
        self.settings = settings
        self.meta = meta
        self._manifest: dict = {}

    def open(self) -> PlainFolder:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        old = json.loads(path.read_text()) if path.exists() else None
        if old is not None:
            if old.get("source") != self.source:
                raise SystemExit(
                    f"{path}: this folder holds source {old.get('source')!r}, not {self.source!r}; use another --dst"
                )
            if old.get("settings") != self.settings:
                raise SystemExit(
                    f"{path}: written with settings {old.get('settings')}, this run has {self.settings}; "
                    "use another output folder (or the same settings) so one folder never mixes two encodings"
                )
        self._manifest = dict(old or {})
        self._manifest.update(
            {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": self.source, "settings": self.settings}
        )
        self._manifest.update(self.meta)
        self._manifest.setdefault("num_samples", 0)
        self._write_manifest()
        return self

    def _write_manifest(self) -> None:
        write_bytes(self.root / MANIFEST, (json.dumps(self._manifest, indent=2) + "\n").encode())

    def paths(self, rel: str, outputs: dict[str, str]) -> dict[str, Path]:
        return {kind: self.root / kind / f"{rel}{ext}" for kind, ext in outputs.items()}

    def is_done(self, rel: str, outputs: dict[str, str]) -> bool:
        return all(p.exists() for p in self.paths(rel, outputs).values())

    def write_sample(self, rel: str, outputs: dict[str, str], values: dict[str, Any]) -> None:
        """Write all targets, RGB last (so an RGB file on disk means a complete sample)."""
        paths = self.paths(rel, outputs)
        if set(values) != set(paths):
            raise ValueError(f"{rel}: converter produced {sorted(values)}, expected {sorted(paths)}")
        for kind in sorted(paths, key=lambda k: k == "rgb"):
            write_value(paths[kind], values[kind])

    # done markers: a whole group (scene) is skipped without touching its files
    def _marker(self, group: str) -> Path:
        return self.root / DONE_DIR / (group.replace("/", "__") + ".json")

    def group_done(self, group: str) -> set[str]:
        try:
            return set(json.loads(self._marker(group).read_text())["samples"])
        except (FileNotFoundError, ValueError, KeyError):
            return set()

    def mark_group_done(self, group: str, rels: Iterable[str]) -> None:
        rels = sorted(set(rels) | self.group_done(group))
        write_bytes(self._marker(group), json.dumps({"group": group, "samples": rels}).encode())

    def finish(self, counts: Counts) -> None:
        self._manifest["num_samples"] = len(list_samples(self.root))
        self._manifest["last_run"] = counts.as_dict()
        self._write_manifest()

    @property
    def num_samples(self) -> int:
        return int(self._manifest.get("num_samples", 0))


# --------------------------------------------------------------------------------------------
# Running a conversion


@dataclass
class Sample:
    rel: str  # output REL
    group: str  # done-marker group (a scene)
    outputs: dict[str, str]  # modality -> extension, e.g. {"rgb": ".png", "depth": ".npy"}
    item: Any = None  # converter-specific (source paths, ids)


@dataclass
class Counts:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "failed": len(self.failed),
                "failures": dict(self.failed[:1000]), **self.notes}

    def report(self, name: str, folder: Path, num_samples: int, stream=None) -> None:
        stream = stream or sys.stdout
        print(
            f"{name} -> {folder}: {self.written} written, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed; {num_samples} samples in the folder",
            file=stream,
        )
        for key, value in self.notes.items():
            print(f"  {key}: {value}", file=stream)
        for rel, reason in self.failed:
            print(f"  FAILED {rel}: {reason}", file=stream)


# Worker state for multiprocessing (set once per process by the pool initializer).
_WORKER: dict[str, Any] = {}


def _init_worker(folder: PlainFolder, convert: Callable[[Sample], dict[str, Any]]) -> None:
    _WORKER["folder"], _WORKER["convert"] = folder, convert


def _process(sample: Sample) -> tuple[Sample, str, str]:
    folder: PlainFolder = _WORKER["folder"]
    if folder.is_done(sample.rel, sample.outputs):
        return sample, "skipped", ""
    try:
        values = _WORKER["convert"](sample)
        folder.write_sample(sample.rel, sample.outputs, values)
    except FileNotFoundError as e:
        return sample, "failed", f"missing file {e.filename or e}"
    except Exception as e:  # one bad sample must not stop a 50k-sample run
        return sample, "failed", f"{type(e).__name__}: {e}"
    return sample, "written", ""


def run_conversion(
    name: str,
    folder: PlainFolder,
    samples: Sequence[Sample],
    convert: Callable[[Sample], dict[str, Any]],
    workers: int = 0,
    counts: Counts | None = None,
) -> Counts:
    """Convert ``samples`` into ``folder`` (resumably) and report the counts.

    ``convert`` must be picklable (a module-level function or a functools.partial of one) when
    ``workers > 0``. Groups whose done marker lists all their planned samples are skipped
    without looking at their files; a group is marked done once all its samples exist.
    """
    from tqdm.auto import tqdm

    counts = counts or Counts()
    folder.open()
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group].append(s)
    todo: list[Sample] = []
    for group, members in by_group.items():
        if {s.rel for s in members} <= folder.group_done(group):
            counts.skipped += len(members)
        else:
            todo.extend(members)
    remaining: dict[str, int] = defaultdict(int)
    for s in todo:
        remaining[s.group] += 1
    failed_groups: set[str] = set()

    def account(sample: Sample, status: str, reason: str) -> None:
        if status == "failed":
            counts.failed.append((sample.rel, reason))
            failed_groups.add(sample.group)
        elif status == "written":
            counts.written += 1
        else:
            counts.skipped += 1
        remaining[sample.group] -= 1
        if remaining[sample.group] == 0 and sample.group not in failed_groups:
            folder.mark_group_done(sample.group, [s.rel for s in by_group[sample.group]])

    bar = tqdm(total=len(todo), desc=name, unit="sample", dynamic_ncols=True)
    if workers and workers > 0 and len(todo) > 1:

        with mp.Pool(workers, initializer=_init_worker, initargs=(folder, convert)) as pool:
            for result in pool.imap_unordered(_process, todo, chunksize=1):
                account(*result)
                bar.update(1)
    else:
        _init_worker(folder, convert)
        for sample in todo:
            account(*_process(sample))
            bar.update(1)
    bar.close()
    folder.finish(counts)
    counts.report(name, folder.root, folder.num_samples)
    return counts
