"""What in-training validation costs: a validation's seconds per image against a training step, in one real run.

    python benchmarks/validation.py --backbone tiny --resolution 64                      # CPU smoke size
    python benchmarks/validation.py --backbone sd21 --resolution 256 --steps 3 --samples 4   # SD 2.1 shapes

Runs `train_depth.py` itself (d3.train_cli's path: the loop, its Accelerator, `d3.validation`) on procedural scenes,
validating on held-out ones every `--every` updates. It clocks every update between two calls of the loop's
validation hook (the step, data loading and logging included, checkpoints off) and every validation (the set's
samples scored through evaluate.py's loop, plus the pictured samples predicted again), and prints the median step,
the seconds per predicted image, and what a validation of NYUv2 100 + KITTI 100 + Hypersim val 80 (4 pictures each)
every 500 updates costs as a share of the training time at the measured rates. The `sd21` backbone has SD 2.1's
shapes and random weights (built once into `--cache_dir`); a step here is one micro-batch (`--batch_size` images,
no accumulation): with gradient accumulation A the step costs about A times as much and the share falls by A.

    python benchmarks/validation.py --backbone sd21 --resolution 256 --score_only --step_s 47.4 --samples 4

`--score_only` times the validation's scoring alone (evaluate.py's loop on the untrained predictor of the backbone,
the work of a validation without the training run around it: for a machine where the training step does not fit
beside other work) and takes the update's time from `--step_s` (e.g. `benchmarks/train_step.py`'s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_CACHE, default_resolution, ensure_backbone, set_threads  # noqa: E402

PAPER_SETS = 100 + 100 + 80  # Marigold's trainer: NYUv2 100, KITTI 100, Hypersim val 80
PAPER_PICTURES = 3 * 4
PAPER_PERIOD = 500
RECIPE_IMAGES = 2 * 16  # the recipes' default update per process: --train_batch_size 2, --gradient_accumulation_steps 16


def recipe_share(per_image: float, train_s_per_image: float) -> float:
    """The paper-style sets' validation every 500 updates of the recipe's default size, as a share of training (each
    process scores 1/P of the samples and trains 1/P of the images: P cancels)."""
    return (PAPER_SETS + PAPER_PICTURES) * per_image / (PAPER_PERIOD * RECIPE_IMAGES * train_s_per_image)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["tiny", "sd21"], default="tiny")
    p.add_argument("--backbone_dir", default=None, help="a diffusers SD folder to use instead of --backbone")
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--resolution", type=int, default=None, help="training and validation square (default 64 / 768)")
    p.add_argument("--batch_size", type=int, default=2, help="images per update (no accumulation)")
    p.add_argument("--steps", type=int, default=8, help="updates (the first one, a warm-up, is not counted)")
    p.add_argument("--every", type=int, default=4, help="validate every this many updates")
    p.add_argument("--samples", type=int, default=8, help="held-out scenes scored per validation")
    p.add_argument("--pictures", type=int, default=2, help="of them pictured")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--score_only", action="store_true", help="time the scoring alone; the step from --step_s")
    p.add_argument("--step_s", type=float, default=None, help="with --score_only: seconds per training update")
    p.add_argument("--step_images", type=int, default=1, help="with --score_only: images in that update")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resolution = args.resolution or default_resolution(args.backbone)
    set_threads(args.num_threads)
    backbone = ensure_backbone(args.backbone, args.cache_dir, args.backbone_dir)
    if args.score_only:
        return score_only(args, backbone, resolution)

    import train_depth
    from d3.data.synthetic import write_synthetic_dataset
    from d3.train_cli import main as train_main
    from d3.validation import Validation

    marks: list[tuple[str, float]] = []

    class Clocked(Validation):  # the loop's hook, timed: entry and exit of every call
        def after_step(self, step: int) -> None:
            marks.append(("in", time.perf_counter()))
            super().after_step(step)
            marks.append(("out", time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_synthetic_dataset(tmp / "train", 2 * args.batch_size, resolution, resolution, seed=0,
                                        tasks=("depth",))
        held = write_synthetic_dataset(tmp / "held", args.samples, resolution, resolution, seed=1, tasks=("depth",))
        out = tmp / "run"
        argv = ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(train), "--output_dir", str(out),
                "--resolution", str(resolution), "--train_batch_size", str(args.batch_size),
                "--gradient_accumulation_steps", "1", "--max_train_steps", str(args.steps),
                "--checkpointing_steps", str(10 * args.steps), "--lr_warmup_steps", "0",
                "--dataloader_num_workers", "0", "--report_to", "none",
                "--validation_dataset", f"synthetic={held}", "--validation_steps", str(args.every),
                "--validation_images", str(args.pictures)]
        import d3.validation as validation

        real = validation.Validation
        validation.Validation = Clocked  # what train_cli hands the loop
        try:
            train_main(train_depth.RECIPE, argv)
        finally:
            validation.Validation = real
        records = [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]
    # step k's time: from the hook's exit after step k-1 to its entry after step k (steps 2..N: step 1 warms up)
    ins = [t for kind, t in marks if kind == "in"]
    outs = [t for kind, t in marks if kind == "out"]
    steps = [ins[k] - outs[k - 1] for k in range(1, len(ins))]
    step_s = statistics.median(steps)
    validations = [r["time_s"] for r in records]
    images = args.samples + min(args.pictures, args.samples)
    per_image = statistics.median(validations) / images
    share = PAPER_SETS + PAPER_PICTURES
    share = share * per_image / (PAPER_PERIOD * step_s)
    result = {"backbone": args.backbone, "resolution": resolution, "batch_size": args.batch_size,
              "step_s": step_s, "validation_s": validations, "images_per_validation": images,
              "s_per_validation_image": per_image, "validation_image_per_step": per_image / step_s,
              "paper_sets_every_500_share": share,
              "recipe_share": recipe_share(per_image, step_s / args.batch_size)}
    print(f"{args.backbone} at {resolution} px, {args.batch_size} images per update, {torch_threads()} threads")
    print(f"  training update (median of {len(steps)}): {step_s:.3f} s")
    print(f"  validation: {statistics.median(validations):.3f} s for {args.samples} samples + "
          f"{min(args.pictures, args.samples)} pictured = {per_image:.4f} s per image "
          f"({per_image / step_s:.3f} of an update)")
    print(f"  NYUv2 100 + KITTI 100 + Hypersim 80 (+12 pictured) every {PAPER_PERIOD} updates: "
          f"{100 * share:.2f} % of the training time at {args.batch_size} images per update, "
          f"{100 * result['recipe_share']:.2f} % at the recipes' {RECIPE_IMAGES}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def score_only(args: argparse.Namespace, backbone: Path, resolution: int) -> dict:
    """evaluate.py's loop over `--samples` held-out scenes with the backbone's untrained predictor, timed."""
    from d3.data.benchmarks import BENCHMARKS
    from d3.data.synthetic import write_synthetic_dataset
    from d3.eval_options import EvalOptions
    from d3.evaluation import evaluate_benchmark
    from d3.predictor import predictor_from_backbone

    predictor = predictor_from_backbone(backbone, "depth", device="cpu", processing_res=resolution)
    predictor.config.resize_mode = "squash"
    with tempfile.TemporaryDirectory() as tmp:
        held = write_synthetic_dataset(Path(tmp) / "held", args.samples, resolution, resolution, seed=1,
                                       tasks=("depth",))
        bench = BENCHMARKS["synthetic"](held)
        evaluate_benchmark(bench, EvalOptions(device="cpu", progress=False), predictor=predictor)  # warm-up
        start = time.perf_counter()
        evaluate_benchmark(bench, EvalOptions(device="cpu", progress=False), predictor=predictor)
        per_image = (time.perf_counter() - start) / args.samples
    print(f"{args.backbone} at {resolution} px, {torch_threads()} threads: scoring {per_image:.3f} s per image")
    result = {"backbone": args.backbone, "resolution": resolution, "s_per_validation_image": per_image}
    if args.step_s:
        share = (PAPER_SETS + PAPER_PICTURES) * per_image / (PAPER_PERIOD * args.step_s)
        recipe = recipe_share(per_image, args.step_s / args.step_images)
        result.update(step_s=args.step_s, validation_image_per_step=per_image / args.step_s,
                      paper_sets_every_500_share=share, recipe_share=recipe)
        print(f"  against a {args.step_s:.3f} s update of {args.step_images} images: {per_image / args.step_s:.3f} "
              f"of an update per image; NYUv2 100 + KITTI 100 + Hypersim 80 (+12 pictured) every {PAPER_PERIOD} "
              f"updates: {100 * share:.2f} % of the training time at that update, {100 * recipe:.2f} % at the "
              f"recipes' {RECIPE_IMAGES} images per update")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
