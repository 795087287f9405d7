"""Pseudo-depth labels for real images (COCO in the paper) from a discriminative depth model.

``python -m d3.pseudo_label --input DIR --output OUT [--model ID_OR_FOLDER] [--batch_size 4]``

Any transformers depth-estimation model works (``AutoModelForDepthEstimation`` + ``AutoImageProcessor``;
a hub id or a local ``save_pretrained`` folder, the default being Depth Pro, as in the paper). The
image processor's ``post_process_depth_estimation`` brings every prediction back to the image's own
resolution (for Depth Pro it also turns the canonical inverse depth into metric depth with the
predicted field of view, which is why the target sizes are always passed).

What is written (the plain folder format of ``d3.prepare.common``): ``OUT/rgb/<REL>.<ext>`` and
``OUT/depth/<REL>.npy`` (float32, H x W), REL being the path under ``--input`` without extension.
Images are decoded as training and inference decode them (``d3.io.load_rgb``: EXIF rotation applied,
alpha composited on white). A plain RGB/greyscale JPEG or PNG decodes the same everywhere and is
copied byte for byte; any other file is written as the exact decoded array in PNG, so the label
matches the stored pixels whoever reads them. Inputs of different sizes are batched together when
the processor gives them the same input shape (Depth Pro always does).

``d3_dataset.json`` records ``model`` and ``depth_kind``:

* ``metric``: depth in metres (Depth Pro with its field-of-view head, ZoeDepth, GLPN, Depth Anything
  metric checkpoints). The training loss range is ``min_depth``/``max_depth`` (1e-5 / 80 m, as the
  official code uses for COCO).
* ``relative``: depth up to an unknown scale (Depth Pro without its field-of-view head).
* ``relative_inverse``: the raw output of relative models (DPT/MiDaS, Depth Anything relative),
  an affine-invariant inverse depth (disparity up to scale *and shift*; larger = nearer), stored
  unchanged. The training reader (``d3.data.folders``) turns it into depth up to scale, 1/value on
  pixels > 0 (≤ 0 = invalid), with no metric range applied; that is exact only when the shift is
  zero, which no reader can check.

``--depth_kind`` overrides the guess from the model type. Re-running skips images whose outputs
exist; a folder labelled by one model refuses labels from another. An unreadable image is reported
by path and the run goes on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from d3 import flags
from d3.io import copy_file, find_images, load_rgb, save_npy, save_png
from d3.prepare.common import Counts, PlainFolder

DEFAULT_MODEL = "apple/DepthPro-hf"
KEEP_EXTS = (".jpg", ".jpeg", ".png")  # copied byte for byte when the pixels need no conversion
DEPTH_KINDS = ("metric", "relative", "relative_inverse")
METRIC_RANGE = (1e-5, 80.0)
EXIF_ORIENTATION = 0x0112


def guess_depth_kind(config: Any) -> str | None:
    """What a model's post-processed output is, from its config; None when it cannot be told."""
    model_type = getattr(config, "model_type", "")
    if model_type == "depth_pro":
        return "metric" if getattr(config, "use_fov_model", False) else "relative"
    if model_type in ("zoedepth", "glpn"):
        return "metric"
    if model_type in ("depth_anything", "prompt_depth_anything"):
        return "metric" if getattr(config, "depth_estimation_type", "relative") == "metric" else "relative_inverse"
    if model_type == "dpt":
        return "relative_inverse"
    return None


def output_name(path: Path, input_dir: Path) -> str:
    """REL of an input image: its path under --input without extension."""
    return path.relative_to(input_dir).with_suffix("").as_posix()


def is_plain(path: Path, image: Image.Image) -> bool:
    """Whether every reader decodes the file to the same RGB pixels (so it can be copied verbatim).

    Other files (EXIF-rotated, alpha, CMYK, 16-bit, palette, non JPEG/PNG) are decoded once with
    ``d3.io.load_rgb`` (as training and inference decode them), labelled, and written as that exact
    array in PNG, so the label never depends on a reader's EXIF or alpha handling.
    """
    return (path.suffix.lower() in KEEP_EXTS and image.mode in ("RGB", "L")
            and image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1))


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick TCP connect to the hub instead of minutes of download retries when offline."""

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _one_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def load_model(model: str, device, dtype):
    """Model + image processor from a local folder, the local hub cache, or the hub.

    Fails with one line that says what to do (a local folder) instead of a traceback.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    def load(**kw):
        processor = AutoImageProcessor.from_pretrained(model, **kw)
        return AutoModelForDepthEstimation.from_pretrained(model, dtype=dtype, **kw), processor

    hint = "download it where there is network and pass the local folder with --model"
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if looks_like_path and not Path(model).expanduser().is_dir():
        raise SystemExit(f"d3.pseudo_label: {model}: no such model folder (pass a folder saved with "
                         "save_pretrained, or a hub id, with --model)")
    try:
        if not Path(model).is_dir():
            try:
                net, processor = load(local_files_only=True)  # already in the Hugging Face cache
            except Exception:
                if not hub_reachable():
                    raise SystemExit(f"d3.pseudo_label: depth model {model!r} is not in the local Hugging Face "
                                     f"cache and the hub cannot be reached; {hint}") from None
                net, processor = load()
        else:
            net, processor = load()
    except SystemExit:
        raise
    except Exception as e:  # missing files, unknown architecture, missing torchvision, ...
        raise SystemExit(f"d3.pseudo_label: cannot load depth model {model!r} ({_one_line(e)}); "
                         f"if it is a hub id, {hint}") from None
    return net.to(device).eval(), processor


class _Images:
    """Decodes and preprocesses one image per item (runs in DataLoader workers)."""

    def __init__(self, items: list[tuple[Path, str]], processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, rel = self.items[i]
        item = {"path": path, "rel": rel, "error": None}
        try:
            with Image.open(path) as im:
                plain = is_plain(path, im)
            rgb = load_rgb(path)
            item["size"] = rgb.shape[:2]
            item["rgb"] = None if plain else rgb  # what to write instead of a copy
            item["pixel_values"] = self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # d3.io.ImageReadError names the file; anything else is reported the same way
            item["error"] = f"{type(e).__name__}: {e}"
        return item


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def _rgb_ext(item: dict) -> str:
    return ".png" if item["rgb"] is not None else item["path"].suffix.lower()


def _write_rgb(item: dict, path: Path) -> None:
    if item["rgb"] is None:
        copy_file(item["path"], path)
    else:
        save_png(path, item["rgb"])


def predict(model, processor, items: list[dict], device, dtype) -> list[np.ndarray]:
    """Depth at each image's own size for a list of preprocessed items (grouped by input shape)."""

    import torch

    takes_source = "source_sizes" in inspect.signature(processor.post_process_depth_estimation).parameters
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_shape[tuple(item["pixel_values"].shape)].append(i)
    depths: list[np.ndarray | None] = [None] * len(items)
    for idx in by_shape.values():
        pixel_values = torch.stack([items[i]["pixel_values"] for i in idx]).to(device=device, dtype=dtype)
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values)
        for key in ("predicted_depth", "field_of_view"):
            if getattr(outputs, key, None) is not None:
                outputs[key] = outputs[key].float()
        sizes = [items[i]["size"] for i in idx]
        extra = {"source_sizes": sizes} if takes_source else {}
        results = processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)
        for i, size, result in zip(idx, sizes, results):
            depths[i] = result["predicted_depth"].float().reshape(size).cpu().numpy()
    return depths  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = flags.ArgumentParser(prog="python -m d3.pseudo_label", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--output", required=True, type=Path, help="plain training folder to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help="depth-estimation model: hub id or local folder")
    p.add_argument("--depth_kind", default="auto", choices=("auto",) + DEPTH_KINDS,
                   help="what the post-processed output is (auto: from the model type)")
    p.add_argument("--source", default="coco", help="source name written to d3_dataset.json")
    p.add_argument("--batch_size", type=int, default=4, help="images per model call")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding and preprocessing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="model weights (auto: float16 on CUDA, float32 elsewhere); post-processing is float32")
    p.add_argument("--max_depth", type=float, default=METRIC_RANGE[1], help="loss range written for metric labels")
    return p


def run(args: argparse.Namespace) -> Counts:
    import torch
    from tqdm.auto import tqdm

    input_dir = Path(args.input)
    if not input_dir.is_dir():  # a folder, so that REL (the path under it) names every sample
        raise SystemExit(f"{input_dir}: not a folder of images")
    from .devices import resolve_device  # torch loads after the arguments are parsed (a fast --help)

    device = resolve_device(args.device)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    model_dir = Path(args.model).expanduser()
    model_id = str(model_dir.resolve()) if model_dir.is_dir() else args.model
    model, processor = load_model(model_id, device, dtype)
    kind = args.depth_kind if args.depth_kind != "auto" else guess_depth_kind(model.config)
    if kind is None:
        raise SystemExit(f"cannot tell whether model type {model.config.model_type!r} predicts metric depth; "
                         f"pass --depth_kind {'|'.join(DEPTH_KINDS)}")

    meta: dict = {"modalities": ["depth"], "depth_kind": kind, "model": model_id,
                  "model_type": model.config.model_type}
    if kind == "metric":
        meta.update(min_depth=METRIC_RANGE[0], max_depth=args.max_depth)
    else:
        meta["depth_note"] = "raw model output, up to scale" + (" and shift; larger = nearer" if kind ==
                                                                   "relative_inverse" else "")
    folder = PlainFolder(args.output, args.source, {"model": model_id, "depth_kind": kind}, meta).open()

    counts = Counts()
    todo, seen = [], {}
    for path in find_images(input_dir):
        rel = output_name(path, input_dir)
        if rel in seen:
            counts.failed.append((str(path), f"same output name {rel!r} as {seen[rel]}"))
            continue
        seen[rel] = path
        rgb_done = any((folder.root / "rgb" / f"{rel}{ext}").exists() for ext in {path.suffix.lower(), ".png"})
        if rgb_done and (folder.root / "depth" / f"{rel}.npy").exists():
            counts.skipped += 1
        else:
            todo.append((path, rel))

    from torch.utils.data import DataLoader

    loader = DataLoader(_Images(todo, processor), batch_size=max(1, args.batch_size), shuffle=False,
                        num_workers=max(0, args.num_workers) if len(todo) > args.batch_size else 0,
                        collate_fn=_collate)
    bar = tqdm(total=len(todo), desc="pseudo-label", unit="img", dynamic_ncols=True)
    for batch in loader:
        good = []
        for item in batch:
            if item["error"] is None:
                good.append(item)
            else:
                counts.failed.append((str(item["path"]), item["error"]))
        if good:
            for item, depth in zip(good, predict(model, processor, good, device, dtype)):
                if not np.all(np.isfinite(depth)):
                    counts.failed.append((str(item["path"]), "prediction has non-finite values"))
                    continue
                paths = folder.paths(item["rel"], {"rgb": _rgb_ext(item), "depth": ".npy"})
                try:
                    save_npy(paths["depth"], depth.astype(np.float32))
                    _write_rgb(item, paths["rgb"])  # last: an rgb file means a complete sample
                except Exception as e:
                    counts.failed.append((str(item["path"]), f"{type(e).__name__}: {e}"))
                    continue
                counts.written += 1
        bar.update(len(batch))
        bar.set_postfix(written=counts.written, failed=len(counts.failed), refresh=False)
    bar.close()
    folder.finish(counts)
    counts.report(f"pseudo-label ({model_id}, {kind})", folder.root, folder.num_samples)
    return counts


def validate_args(args: argparse.Namespace) -> None:
    """The checks that need no model (the model itself is looked up by `run`, which names --model if it fails)."""
    flags.existing_path("--input", args.input, "no such folder of images", folder=True)
    flags.at_least("--batch_size", args.batch_size, 1)
    flags.at_least("--num_workers", args.num_workers, 0)
    flags.positive("--max_depth", args.max_depth)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise flags.bad("--output", args.output, "is a file, not a folder")


def main(argv: list[str] | None = None) -> int:
    args = flags.parse_checked(build_parser(), validate_args, argv)
    counts = run(args)
    return 1 if counts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
