"""Inference speed and memory: infer.py end to end over a folder of JPEGs against the model alone, in one run.

    python benchmarks/inference.py --backbone tiny --resolution 64 --batch_size 2        # CPU smoke size
    python benchmarks/inference.py --backbone sd21 --resolution 768 --batch_size 8 \\
        --channels_last --compile                                                     # an H100, bf16

- model only: `D3Predictor.predict_tensor` (VAE encode + UNet + VAE decode) on a batch already on the device;
- end to end: `infer.main` over `--num_images` JPEGs of `--resolution`² written here, with the same predictor and
  batch size: reading, decoding, resizing, the model, post-processing and writing every output file (atomically).
  The model is loaded (and compiled) once before both are timed; its load time is printed separately.
The ratio (end to end / model only) says how much of the model's speed the file pipeline keeps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE,
    PeakMemory,
    Row,
    attention_kind,
    count_flops,
    default_resolution,
    describe_device,
    ensure_backbone,
    goal_lines,
    peak_tflops,
    pick_device,
    print_table,
    set_threads,
    synchronize,
    time_block,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["tiny", "sd21"], default="tiny",
                   help="tiny: the test backbone; sd21: SD 2.1 shapes with random weights (for the GPU)")
    p.add_argument("--backbone_dir", default=None, help="a diffusers SD folder to use instead of --backbone")
    p.add_argument("--checkpoint", default=None, help="a d3 checkpoint folder to use instead of a built one")
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                   help="where built backbones/checkpoints are kept (default: $D3_BENCH_CACHE or "
                        "~/.cache/d3-benchmarks)")
    p.add_argument("--task", choices=["depth", "normal", "matting"], default="depth")
    p.add_argument("--resolution", type=int, default=None,
                   help="JPEG side and processing resolution (default: 64 tiny, 768 sd21)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_images", type=int, default=None,
                   help="images per side and round (default: 16 CPU, 256 GPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU, fp32 on the CPU (as infer.py)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--workers", type=int, default=None, help="infer.py reader/writer threads (default: its own)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per side (compilation happens here)")
    p.add_argument("--rounds", type=int, default=2, help="the sides alternate this many times")
    p.add_argument("--no_flops", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense peak for the physical-limit line (default: 790 on an H100)")
    p.add_argument("--device", default=None)
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a shared CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    """A d3 checkpoint folder whose student is the (random) backbone's UNet: speed does not depend on training."""
    if args.checkpoint:
        return Path(args.checkpoint)
    import os

    from d3.predictor import predictor_from_backbone

    backbone = ensure_backbone(args.backbone, args.cache_dir, args.backbone_dir)
    name = f"checkpoint-{args.task}-" + (Path(args.backbone_dir).name if args.backbone_dir else args.backbone)
    path = Path(args.cache_dir) / name
    if not (path / "d3_config.json").exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        predictor_from_backbone(backbone, args.task, device="cpu", dtype="fp32").save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Smooth random pictures (JPEG decodes at realistic cost only for photo-like content, not for noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        f = rng.uniform(1, 6, (3, 2))
        ph = rng.uniform(0, 2 * np.pi, 3)
        rgb = [np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + ph[c]) for c in range(3)]
        arr = (np.stack(rgb, -1) * 100 + 128 + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> dict:
    import infer
    from d3.outputs import SUFFIXES
    from d3.predictor import D3Predictor

    args = parse_args(argv)
    args.resolution = args.resolution or default_resolution(args.backbone)
    set_threads(args.num_threads)
    device = pick_device(args.device)
    n_images = args.num_images or (256 if device.type == "cuda" else 16)
    batch = max(1, args.batch_size)
    n_batches = max(1, n_images // batch)
    n_images = n_batches * batch

    checkpoint = ensure_checkpoint(args)
    start = time.perf_counter()
    predictor = D3Predictor.from_pretrained(checkpoint, device=device, dtype=args.dtype, task=args.task)
    synchronize(device)
    load_seconds = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    flops = None if args.no_flops else count_flops(lambda: predictor.predict_tensor(x)) / batch
    predictor.speed_up(channels_last=args.channels_last, compile=args.compile, compile_backend=args.compile_backend)

    work = Path(tempfile.mkdtemp(prefix="d3-bench-infer-"))
    try:
        write_jpegs(work / "warmup", batch * max(1, args.warmup), args.resolution, seed=1)
        write_jpegs(work / "input", n_images, args.resolution)
        flags = ["--checkpoint", str(checkpoint), "--processing_res", str(args.resolution),
                 "--batch_size", str(batch)] + (["--workers", str(args.workers)] if args.workers else [])

        model_meter = PeakMemory(device)
        e2e_meter = PeakMemory(device, model_meter.baseline)
        time_block(lambda: predictor.predict_tensor(x), max(1, args.warmup), device)
        code = infer.main(["--input", str(work / "warmup"), "--output", str(work / "warmup-out"), *flags],
                          predictor=predictor)
        if code != 0:
            raise SystemExit(f"error: infer.py failed on the warm-up images (exit {code})")
        model_seconds = e2e_seconds = 0.0
        for r in range(args.rounds):  # alternate, so that drift in the machine's load affects both sides alike
            with model_meter:
                model_seconds += time_block(lambda: predictor.predict_tensor(x), n_batches, device)
            output = work / f"output-{r}"
            with e2e_meter:
                synchronize(device)
                start = time.perf_counter()
                code = infer.main(["--input", str(work / "input"), "--output", str(output), *flags],
                                  predictor=predictor)
                synchronize(device)
                e2e_seconds += time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"error: infer.py failed (exit {code})")
        written = len(list(output.glob(f"*{SUFFIXES[args.task][0]}")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timed = n_images * args.rounds
    rows = [Row("model only (encode + UNet + decode)", model_seconds, timed, model_meter.peak),
            Row("infer.py end to end (JPEG in, files out)", e2e_seconds, timed, e2e_meter.peak)]
    ratio = rows[1].images_per_s / rows[0].images_per_s
    ratios = {"end to end / model only (images/s)": f"{ratio:.2f}"}
    extra = [f"model load: {load_seconds:.1f} s (not in the timings)"]
    peak = peak_tflops(device, args.peak_tflops)
    if flops:
        line = f"counted FLOPs per image (model): {flops / 1e12:.3g} TFLOP"
        if peak:
            limit_ms = 1000 * flops / (peak * 1e12)
            line += (f" -> {limit_ms:.1f} ms/image at {peak:g} TFLOP/s (physical limit); model achieves "
                     f"{limit_ms / rows[0].ms_per_image:.0%}, end to end {limit_ms / rows[1].ms_per_image:.0%}")
        extra.append(line)
    on_target = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and args.resolution == 768 \
        and (args.backbone == "sd21" or bool(args.backbone_dir or args.checkpoint))
    extra += goal_lines(on_target, [
        ("end-to-end ms per image", rows[1].ms_per_image, "<=", 25.0),
        ("end to end / model only", ratio, ">=", 0.85)]
        + ([("peak GPU GiB at batch 1", rows[1].peak_bytes / 2**30, "<=", 4.0)] if batch == 1 else []))
    device_text = describe_device(device)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[predictor.dtype]
    setting = {
        "checkpoint": checkpoint,
        "task": args.task,
        "precision": dtype_name,
        "resolution": args.resolution,
        "batch size": batch,
        "flags": ", ".join(f for f, on in [("channels_last", args.channels_last), ("compile", args.compile)] if on)
        or "none",
        "attention": attention_kind(predictor.unet),
        "timed": f"{args.rounds} rounds x {n_images} images per side after {args.warmup} warm-up batches; "
                 f"{written} output sets written per round",
    }
    print_table("inference", device_text, setting, rows, ratios, model_meter.label, extra)
    result = {r.side: {"ms_per_image": r.ms_per_image, "images_per_s": r.images_per_s,
                       "peak_memory_bytes": r.peak_bytes} for r in rows}
    result.update(ratio=ratio, written=written, images=n_images, load_seconds=load_seconds, device=device_text,
                  tflop_per_image=None if flops is None else flops / 1e12,
                  setting={k: str(v) for k, v in setting.items()})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
