"""Training datasets: our plain folder format and the authors' released preprocessed format.

Plain folder format (written by `d3.prepare`, `d3.pseudo_label`, `d3.data.synthetic`)::

    ROOT/d3_dataset.json        optional: source, depth_png_scale, min_depth, max_depth, depth_kind
    ROOT/rgb/REL.{png,jpg,...}  (also accepted: image/, images/, blurred_image/, original_image/)
    ROOT/depth/REL.{npy,png,h5} metres; ≤ 0 = invalid; uint16 PNG × depth_png_scale (default 0.001)
    ROOT/normal/REL.{npy,png}   unit normals (H,W,3), camera frame x right, y up, z toward the camera; 0 = invalid
    ROOT/alpha/REL.png          alpha matte (also accepted: alphas/, mask/, masks/)

The image folder and the target folder pair up by REL, so P3M's `blurred_image/` + `mask/`, `image/` + `mask/`,
`images/` + `alphas/` and `images/` + `masks/` all work as they are.

`depth_kind` in d3_dataset.json says what the depth files hold:

* ``metric`` (default): depth in metres; valid where min_depth < d < max_depth (defaults 1e-5 and 80 m).
* ``relative``: depth up to an unknown scale (e.g. Depth Pro without its field-of-view head).
* ``relative_inverse``: disparity up to an unknown scale, larger = nearer (what `d3.pseudo_label` writes for
  DPT / MiDaS / Depth Anything relative models: their raw output). The reader turns it into depth, 1/value on
  pixels > 0; pixels ≤ 0 are invalid. The conversion is exact for a disparity known up to scale; such models'
  outputs may also carry an unknown shift, which no reader can remove, so 1/value is then only an approximation
  of depth up to scale.

For both relative kinds the scale is arbitrary, so no metric range may cut the depth: the valid range defaults to
0 < d < inf (min_depth / max_depth in d3_dataset.json, if given, still apply to the converted depth). Nothing
downstream needs metres: the depth target is normalised per image by its 2 %/98 % quantiles, and the affine-invariant
loss fits its own scale and shift. Any other `depth_kind` is an error naming the file.

A sample is what the authors' loaders give, with image and ground truth resized independently (their sizes need not
match): "rgb" (3,R,R) in [-1, 1], squashed to the square training size with PIL's bilinear filter; "target" (3,R,R)
the task's target image in [-1, 1], made by the task recipe's `encode_target` (see `TrainingFolder`; the authors'
depth format carries it pre-encoded): depth and normal targets are encoded at native size, then resized bilinearly
(no antialias), mattes are resized first; for depth and normals "gt" (the metric depth (1,h,w) or the unit normals
(3,h,w)) and "valid" (1,h,w) at the ground truth's NATIVE size (or at R×R with `loss_resolution="train"`), where
the task losses are taken; "path" and "source". Depth is valid inside the source's range (Hypersim 1e-5 < d < 65 m,
vKITTI and COCO 1e-5 < d < 80 m, else `min_depth`/`max_depth`), normals where ‖n‖ > 1e-4. Batch with `collate`.
Unreadable samples raise `BadSampleError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..io import IMAGE_EXTENSIONS, ImageReadError, load_rgb
from ..layouts import IMAGE_DIRS, TARGET_DIRS, TARGET_EXTS
from .rasters import (BadSampleError, _image_full_scale, _resize_alpha, _resize_nearest, png_to_normals, read_array,
                      resize_bilinear, resize_rgb)

MODALITIES = ("depth", "normal", "alpha")
RGB_DIRS, MODALITY_DIRS, MODALITY_EXTS = IMAGE_DIRS, TARGET_DIRS, TARGET_EXTS  # d3.layouts: evaluation reads them too
# Valid depth ranges of the official code's source types (metres).
SOURCE_DEPTH_RANGE = {"hypersim": (1e-5, 65.0), "vkitti": (1e-5, 80.0), "coco": (1e-5, 80.0)}
NORMAL_VALID_NORM = 1e-4  # a ground-truth normal shorter than this is invalid
LOSS_RESOLUTIONS = ("native", "train")


@dataclass
class DatasetMeta:
    source: str = "real"
    depth_png_scale: float = 0.001
    min_depth: float = 1e-5
    max_depth: float = 80.0
    depth_kind: str = "metric"
    extra: dict = field(default_factory=dict)
    KINDS = ("metric", "relative", "relative_inverse")  # what "depth_kind" may say (module docstring)

    @classmethod
    def read(cls, root: Path) -> DatasetMeta:
        path = root / "d3_dataset.json"
        guess = "/".join(root.resolve().parts[-2:]).lower()  # the folder and its parent: P3M-10k/train is p3m
        source = next((s for s in ("hypersim", "vkitti", "sintel", "p3m", "coco", "synthetic") if s in guess), "real")
        if source == "real" and "kitti" in guess:
            source = "vkitti"
        if not path.exists():
            lo, hi = SOURCE_DEPTH_RANGE.get(source, (1e-5, 80.0))
            return cls(source=source, min_depth=lo, max_depth=hi)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        known = {k: data.pop(k) for k in ("source", "depth_png_scale", "min_depth", "max_depth", "depth_kind") if k in data}
        known.setdefault("source", source)
        kind = known.get("depth_kind", "metric")
        if kind not in cls.KINDS:
            raise ValueError(f"{path}: depth_kind {kind!r} is not one of {cls.KINDS}")
        if kind != "metric":  # depth up to an arbitrary scale: a range in metres would cut it arbitrarily
            known.setdefault("min_depth", 0.0)
            known.setdefault("max_depth", float("inf"))
        return cls(**known, extra=data)


def _find_sibling(folder: Path, rel: str, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        candidate = folder / f"{rel}{ext}"
        if candidate.exists():
            return candidate
    return None


class TrainingFolder(Dataset):
    """One source of training samples (plain format), resized to `resolution`².

    `encode_target(raw) -> (3,h,w) in [-1, 1]` is the task recipe's target encoding (`TaskRecipe.encode_target`,
    e.g. `train_depth.encode_depth_target`); the reader owns only reading, validity and resizing. `raw` holds:

    * depth: ``{"depth": (1,h,w) float, invalid pixels zeroed, "valid": (1,h,w) bool}`` at the ground truth's
      native size; the target is then resized bilinearly to R×R.
    * normal: ``{"normal": (3,h,w) float (zero vectors = invalid), "valid": (1,h,w) bool}`` at native size; the
      target is then resized bilinearly to R×R.
    * alpha: ``{"alpha": (1,R,R) float in [0, 1]}``, already squashed to R×R (`_resize_alpha`: 8-bit mattes in 8
      bits, as the authors load them); the target is used as returned.

    A folder of raw ground truth (every plain folder, the authors' normal .h5) needs one: without it the constructor
    raises a ValueError naming the folder and modality. A subclass whose files carry the encoded target
    (`PRE_ENCODED_TARGET`: the authors' depth format) needs none.
    """

    PRE_ENCODED_TARGET = False  # True: the files hold the target image itself; encode_target is not used

    def __init__(
        self,
        root: str | Path,
        modality: str,
        resolution: int,
        encode_target: Callable[[dict], torch.Tensor] | None = None,
        max_samples: int | None = None,
        items: list[tuple[Path, Path, Path | None]] | None = None,
        meta: DatasetMeta | None = None,
        loss_resolution: str = "native",
    ):
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"unknown loss resolution {loss_resolution!r}; expected one of {LOSS_RESOLUTIONS}")
        self.loss_resolution = loss_resolution
        self.root = Path(root)
        self.modality = modality
        self.resolution = resolution
        self.encode_target = encode_target
        self.meta = meta or DatasetMeta.read(self.root)
        self.items = items if items is not None else self._discover()
        if max_samples is not None:
            self.items = self.items[:max_samples]
        if not self.items:
            raise ValueError(f"{self.root}: no training samples found for '{modality}' (see d3/data/folders.py)")
        if encode_target is None and not self.PRE_ENCODED_TARGET:
            raise ValueError(f"{self.root}: '{modality}' ground truth needs the task recipe's target encoding "
                             "(encode_target, e.g. train_<task>.RECIPE.encode_target), and none was given")

    @property
    def name(self) -> str:
        return self.meta.source

    def _discover(self) -> list[tuple[Path, Path, Path | None]]:
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: no such dataset folder")
        rgb_dir = next((self.root / d for d in RGB_DIRS if (self.root / d).is_dir()), None)
        target_dir = next((self.root / d for d in MODALITY_DIRS[self.modality] if (self.root / d).is_dir()), None)
        if rgb_dir is None or target_dir is None:
            found = sorted(p.name + "/" for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            missing = [f"no {what} folder (expected one of {', '.join(d + '/' for d in dirs)})"
                       for what, dirs, d in (("image", RGB_DIRS, rgb_dir),
                                             (self.modality, MODALITY_DIRS[self.modality], target_dir)) if d is None]
            found = f"its subfolders are {', '.join(found)}" if found else "it has no subfolders"
            raise ValueError(f"{self.root}: {' and '.join(missing)} for '{self.modality}' training (images and "
                             f"targets are paired by file name); {found}")
        items = []
        for image in sorted(p for p in rgb_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            rel = str(image.relative_to(rgb_dir).with_suffix(""))
            # A missing target is kept: it is reported as a bad sample with its path when it is read.
            target = _find_sibling(target_dir, rel, MODALITY_EXTS[self.modality]) or target_dir / f"{rel}.<missing>"
            items.append((image, target, None))
        return items

    def __len__(self) -> int:
        return len(self.items)

    # -- loading -------------------------------------------------------------------------------------------------
    def _load_target(self, path: Path, extra: Path | None) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise BadSampleError(f"{path}: missing {self.modality} file")
        if self.modality == "depth":
            depth = read_array(path, png_scale=self.meta.depth_png_scale if path.suffix == ".png" else 1.0)
            if depth.ndim == 3:
                depth = depth[..., 0]
            if self.meta.depth_kind == "relative_inverse":  # disparity up to scale -> depth up to scale
                disparity = depth.astype(np.float64)
                positive = np.isfinite(disparity) & (disparity > 0)
                depth = np.where(np.isfinite(disparity), 0.0, disparity)  # NaN / inf kept: rejected as non-finite
                depth[positive] = 1.0 / disparity[positive]
                depth[depth > np.finfo(np.float32).max] = 0.0  # 1/(a subnormal) overflows float32: invalid
                depth = depth.astype(np.float32)
            return {"depth": torch.from_numpy(depth)[None]}
        if self.modality == "normal":
            normal = read_array(path, png_scale=1.0)
            if normal.ndim != 3 or normal.shape[-1] != 3:
                raise BadSampleError(f"{path}: expected normals of shape (H, W, 3), got {normal.shape}")
            if path.suffix.lower() == ".png":
                normal = png_to_normals(normal)
            return {"normal": torch.from_numpy(np.ascontiguousarray(normal)).permute(2, 0, 1)}
        alpha = read_array(path)
        if alpha.ndim == 3:  # a colour mask: its brightest channel (as evaluate.py reads masks); grey + alpha: the grey
            alpha = alpha[..., :3].max(-1) if alpha.shape[-1] >= 3 else alpha[..., 0]
        top = 1.0 if path.suffix == ".npy" else _image_full_scale(path)
        alpha = alpha.astype(np.uint8) if top == 255.0 else (alpha / top).astype(np.float32)
        return {"alpha": alpha}  # native, resized in __getitem__

    def _check_finite(self, arrays: dict, path: Path) -> None:
        for name, t in arrays.items():
            if not np.isfinite(np.asarray(t)).all():
                raise BadSampleError(f"{path}: {name} contains NaN or inf values")

    def __getitem__(self, index: int) -> dict:
        image_path, target_path, extra = self.items[index]
        try:
            rgb = load_rgb(image_path)
        except ImageReadError as err:
            raise BadSampleError(str(err)) from None
        try:
            raw = self._load_target(target_path, extra)
        except BadSampleError:
            raise
        except Exception as err:
            raise BadSampleError(f"{target_path}: cannot read ({type(err).__name__}: {err})") from None
        self._check_finite(raw, target_path)
        # Image and ground truth are resized independently (their sizes need not match), as the authors do.
        size = self.resolution
        sample: dict = {"path": str(image_path), "source": self.name, "rgb": resize_rgb(rgb, size)}
        if "alpha" in raw:  # mattes are resized first and scored at the training size, over the whole image
            alpha = torch.from_numpy(_resize_alpha(raw["alpha"], size))[None]
            sample["target"] = self.encode_target({"alpha": alpha})
            return sample
        if "depth" in raw:
            gt = raw["depth"]
            valid = (gt > self.meta.min_depth) & (gt < self.meta.max_depth)
        else:
            gt = raw["normal"]
            valid = gt.norm(dim=0, keepdim=True) > NORMAL_VALID_NORM
        if not valid.any():
            raise BadSampleError(f"{target_path}: no valid pixel")
        if "target_image" in raw:  # the authors' format: a target image already normalised to [0, 1]
            target = raw["target_image"] * 2 - 1
        elif "normal" in raw:
            target = self.encode_target({"normal": gt, "valid": valid})
        else:
            target = self.encode_target({"depth": gt * valid, "valid": valid})
        sample["target"] = resize_bilinear(target, (size, size))  # encoded at native size, then resized
        if self.loss_resolution == "train":
            gt = resize_bilinear(gt, (size, size)) if "normal" in raw else _resize_nearest(gt, size)
            valid = _resize_nearest(valid.float(), size) > 0.5
        sample["gt"], sample["valid"] = gt, valid
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack a batch; native-size ground truth ("gt", "valid") stays a list, since sizes may differ per image."""
    ragged = {k: [s[k] for s in samples] for k in ("gt", "valid") if k in samples[0]}
    rest = default_collate([{k: v for k, v in s.items() if k not in ragged} for s in samples])
    return {**rest, **ragged}


class OfficialDepthFolder(TrainingFolder):
    """The authors' preprocessed depth set: rgb/<stem>.<ext>, depth/<stem>.h5 (normalised [0,1], H×W×3),
    depth_ori/<stem>.h5 (metric). One instance per source, chosen by file-name prefix as the official loader does.
    The target comes pre-encoded (depth/), so no `encode_target` is needed or used."""

    PRE_ENCODED_TARGET = True
    PREFIXES = {"hypersim": ("ai", ".png"), "vkitti": ("Scene", ".jpg"), "coco": ("coco", ".jpg")}

    def _load_target(self, path: Path, extra: Path | None) -> dict[str, torch.Tensor]:
        for p in (path, extra):
            if p is None or not p.exists():
                raise BadSampleError(f"{p}: missing depth file")
        target = read_array(path, h5_key="depth")
        if target.ndim == 2:
            target = np.repeat(target[..., None], 3, axis=2)
        metric = read_array(extra, h5_key="depth")
        if metric.ndim == 3:
            metric = metric[..., 0]
        return {
            "depth": torch.from_numpy(metric)[None],
            "target_image": torch.from_numpy(np.ascontiguousarray(target)).permute(2, 0, 1),
        }

    @classmethod
    def sources(cls, root: Path, resolution: int, max_samples: int | None = None, **kw) -> list[TrainingFolder]:
        found = []
        images = sorted(p for p in (root / "rgb").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for source, (prefix, ext) in cls.PREFIXES.items():
            items = [
                (p, root / "depth" / f"{p.stem}.h5", root / "depth_ori" / f"{p.stem}.h5")
                for p in images
                if p.name.startswith(prefix) and p.suffix.lower() == ext
            ]
            if items:
                lo, hi = SOURCE_DEPTH_RANGE[source]
                meta = DatasetMeta(source=source, min_depth=lo, max_depth=hi)
                found.append(cls(root, "depth", resolution, None, max_samples, items=items, meta=meta, **kw))
        return found


class OfficialNormalFolder(TrainingFolder):
    """The authors' normal set: rgb/<stem>.*, normal/<stem>.h5 with key 'depth' (sic) holding H×W×3 normals.
    Files starting with 'sintel' form the Sintel source, all others Hypersim. The normals are raw: the task recipe's
    `encode_target` makes the target, as for a plain folder."""

    def _load_target(self, path: Path, extra: Path | None) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise BadSampleError(f"{path}: missing normal file")
        normal = read_array(path, h5_key="depth")
        return {"normal": torch.from_numpy(np.ascontiguousarray(normal)).permute(2, 0, 1)}

    @classmethod
    def sources(cls, root: Path, resolution: int, encode_target: Callable[[dict], torch.Tensor] | None,
                max_samples: int | None = None, **kw) -> list[TrainingFolder]:
        images = sorted(p for p in (root / "rgb").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        groups = {"sintel": [p for p in images if p.name.startswith("sintel")]}
        groups["hypersim"] = [p for p in images if not p.name.startswith("sintel")]
        return [
            cls(root, "normal", resolution, encode_target, max_samples,
                items=[(p, root / "normal" / f"{p.stem}.h5", None) for p in items], meta=DatasetMeta(source=name),
                **kw)
            for name, items in groups.items()
            if items
        ]


def open_sources(
    root: str | Path,
    modality: str,
    resolution: int,
    encode_target: Callable[[dict], torch.Tensor] | None = None,
    max_samples: int | None = None,
    loss_resolution: str = "native",
) -> list[TrainingFolder]:
    """All training sources in a folder: one for the plain format, one per file-name group for the authors' format.
    `encode_target` is the task recipe's target encoding (`TrainingFolder`); every format but the authors' depth
    folders (whose targets come pre-encoded) needs it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such dataset folder")
    if modality == "depth" and (root / "depth_ori").is_dir():
        return OfficialDepthFolder.sources(root, resolution, max_samples, loss_resolution=loss_resolution)
    if modality == "normal" and (root / "normal").is_dir() and any((root / "normal").glob("*.h5")):
        return OfficialNormalFolder.sources(root, resolution, encode_target, max_samples,
                                            loss_resolution=loss_resolution)
    return [TrainingFolder(root, modality, resolution, encode_target, max_samples, loss_resolution=loss_resolution)]
