"""Predict depth, surface normals or alpha mattes for a folder of images (or one image) in one UNet pass each.

    python infer.py --input photos/ --checkpoint d3-depth --output predictions/

Outputs mirror the input folder structure (file names per task: see d3/outputs.py or the README). A file that
cannot be read is reported with its reason; the others are still processed, and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3.io import ImageReadError, find_images, load_rgb
from d3.outputs import output_paths, write_outputs
from d3.predictor import RESIZE_MODES, TASKS, CheckpointError, D3Predictor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a d3 checkpoint folder")
    p.add_argument("--output", default="d3_predictions", help="output folder (default: ./d3_predictions)")
    p.add_argument("--task", choices=TASKS, default=None, help="default: the checkpoint's task")
    p.add_argument("--processing_res", type=int, default=None,
                   help="long side of the network input (default: the checkpoint's, 768); 0 = native size")
    p.add_argument("--resize_mode", choices=RESIZE_MODES, default=None,
                   help="keep_aspect (default) or squash to a square as the authors' code does")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: bf16/fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", default=None, help="default: cuda > mps > cpu")
    p.add_argument("--skip_existing", action="store_true", help="skip images whose outputs all exist already")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    source = Path(args.input)
    if not source.exists():
        print(f"error: {source}: no such file or folder", file=sys.stderr)
        return 2
    files = find_images(source)
    if not files:
        print(f"error: {source}: no images found (looked for .png .jpg .jpeg .bmp .webp .tif .tiff)", file=sys.stderr)
        return 2
    try:
        predictor = D3Predictor.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, task=args.task)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    root = source if source.is_dir() else source.parent
    output = Path(args.output)
    task = predictor.task
    todo = []
    for f in files:
        base = output / f.relative_to(root).with_suffix("")
        if args.skip_existing and all(p.exists() for p in output_paths(base, task)):
            continue
        todo.append((f, base))

    failures: list[tuple[Path, str]] = []
    written = 0
    batch_size = max(1, args.batch_size)
    bar = tqdm(total=len(todo), desc=f"{task}", unit="img")
    for start in range(0, len(todo), batch_size):
        chunk, images = [], []
        for f, base in todo[start : start + batch_size]:
            try:
                images.append(load_rgb(f))
                chunk.append((f, base))
            except ImageReadError as err:
                failures.append((f, str(err).split(": ", 1)[-1]))
        if images:
            predictions = predictor.predict(images, processing_res=args.processing_res, batch_size=batch_size,
                                            resize_mode=args.resize_mode)
            for (f, base), image, pred in zip(chunk, images, predictions):
                try:
                    write_outputs(base, task, pred, image)
                    written += 1
                except OSError as err:
                    failures.append((f, f"cannot write outputs ({err})"))
        bar.update(len(todo[start : start + batch_size]))
    bar.close()

    skipped = len(files) - len(todo)
    for f, reason in failures:
        print(f"failed: {f}: {reason}", file=sys.stderr)
    print(f"{written} written, {skipped} skipped (already done), {len(failures)} failed -> {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
