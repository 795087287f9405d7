"""Where a folder of image/target pairs keeps its images and its targets: one list, read by training
(`d3.data.folders`) and by evaluation (`evaluate.py --dataset folder`, `d3.data.benchmarks.SegmentationFolder`).

A folder keeps its images in the first of `IMAGE_DIRS` it has, and a modality's targets in the first of that
modality's `TARGET_DIRS`; the image ``<image dir>/REL.<ext>`` pairs with the target ``<target dir>/REL.<ext>`` for
the first of `TARGET_EXTS` that exists (REL: the path inside the image folder without its extension, sub-folders
included). So P3M's ``blurred_image/`` + ``mask/``, ``image/`` + ``mask/``, ``images/`` + ``masks/`` and our
``rgb/`` + ``alpha/`` are all read as they are, by training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

from .io import IMAGE_EXTENSIONS

IMAGE_DIRS = ("rgb", "image", "images", "blurred_image", "original_image")
TARGET_DIRS = {"depth": ("depth",), "normal": ("normal",), "alpha": ("alpha", "alphas", "mask", "masks")}
TARGET_EXTS = {"depth": (".npy", ".png", ".h5"), "normal": (".npy", ".png", ".h5"), "alpha": (".png", ".jpg", ".npy")}


def folder_names(dirs: Iterable[str]) -> str:
    """``a/, b/ or c/`` for messages."""
    names = [f"{d}/" for d in dirs]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def first_present(candidates: Iterable[str], present: Iterable[str]) -> str | None:
    """The first of `candidates` among the folder names `present`, or None."""
    present = set(present)
    return next((c for c in candidates if c in present), None)


def pair_files(files: Iterable[str], modality: str) -> tuple[str | None, str | None, list[tuple[str, str | None]]]:
    """Pair the images and targets among `files` (POSIX paths relative to the folder, hidden files excluded by the
    caller): (image dir, target dir, [(image path, its target's path or None)]), images sorted; the dirs are None when
    the folder has none of the names."""
    files = sorted(files)
    tops = {PurePosixPath(f).parts[0] for f in files if len(PurePosixPath(f).parts) > 1}
    image_dir, target_dir = first_present(IMAGE_DIRS, tops), first_present(TARGET_DIRS[modality], tops)
    if image_dir is None or target_dir is None:
        return image_dir, target_dir, []
    fileset = set(files)
    pairs = []
    for f in files:
        path = PurePosixPath(f)
        if path.parts[0] != image_dir or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = PurePosixPath(*path.parts[1:]).with_suffix("")
        target = next((t for t in (f"{target_dir}/{rel}{ext}" for ext in TARGET_EXTS[modality]) if t in fileset),
                      None)
        pairs.append((f, target))
    return image_dir, target_dir, pairs
