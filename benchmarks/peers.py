"""d3 side by side with its peers: the same photographs, weights, processing resolution, precision and threads.

    python benchmarks/peers.py --backbone tiny --resolution 64 --num_images 3 --rounds 1      # smoke size
    python benchmarks/peers.py --backbone sd21 --resolution 256 --num_images 6 --rounds 2 --num_threads 2

Each peer goes from a folder of JPEGs (mixed sizes and aspect ratios) to files on disk, in this process, timed end
to end with the model already loaded:
- d3: `infer.main` (keep-aspect resize of the long side to --resolution, one UNet pass, npy + 16-bit + colour PNG),
  as its CPU default runs (reading and writing in turn with the model, one thread) and again with `--workers 1`
  (a reader and a writer thread overlapping the model, the GPU default);
- Marigold (diffusers' `MarigoldDepthPipeline`, num_inference_steps=1, ensemble_size=1): a UNet of the same
  config but 8 input channels (image latent + noise, as Marigold's), random weights, DDIM (trailing spacing), the
  same VAE; its depth written with the same writer as infer.py (npy + 16-bit + colour PNG);
- the authors' procedure as they describe it: squash to --resolution² with plain bilinear, VAE encode taking a
  posterior *sample*, one UNet pass with the prompt embedding at the student timestep, decode, channel mean,
  bilinear back to the input size, one colour PNG.
The peers alternate over --rounds (their order rotating), so drift in a shared machine's load affects all alike.
Also measured: d3's model only (encode + UNet + decode on the same network inputs, no files), this CPU's peak fp32
GEMM rate against the FLOP/s d3 achieves, and (--padding_check_res) what padding to multiples of 64 costs
(d3 padded its network input to them before; now it pads, as Marigold does, only to the VAE factor, 8).

The images are scikit-image's sample photographs when it is installed, else rendered `d3.data.synthetic` scenes;
the output says which.
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
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE,
    PeakMemory,
    Row,
    count_flops,
    default_resolution,
    describe_device,
    ensure_backbone,
    goal_lines,
    print_table,
    set_threads,
)

D3, MARIGOLD, AUTHORS = "d3 (infer.py)", "Marigold (diffusers, 1 step, ensemble 1)", "authors' procedure"
D3_THREADED = "d3 (infer.py --workers 1: a reader and a writer thread)"
PEERS = (D3, MARIGOLD, AUTHORS)
# skimage.data photographs (colour ones; a grey one is converted to RGB by the reader like any grey JPEG)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "coins")
ASPECTS = ((4, 3), (1, 1), (3, 4))  # width : height, cycled
UPSCALE = (1.5, 2.0, 2.5)  # long side of the JPEG / processing resolution, cycled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["tiny", "sd21"], default="tiny")
    p.add_argument("--backbone_dir", default=None, help="a diffusers SD folder to use instead of --backbone")
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--resolution", type=int, default=None, help="processing resolution (long side; the authors' "
                   "square). Default: 64 tiny, 768 sd21")
    p.add_argument("--num_images", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count and the GEMM peak")
    p.add_argument("--padding_check_res", type=int, default=0,
                   help="also time d3's model at this processing resolution with the network input padded to "
                        "d3's size multiple (64 for SD) against the VAE factor (8 for SD, as Marigold); 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ images
def _source_images(count: int, seed: int) -> tuple[list[np.ndarray], str]:
    try:
        from skimage import data
    except ImportError:
        return _synthetic(count, seed), "d3.data.synthetic scenes (scikit-image is not installed)"
    pictures, names = [], []
    for name in PHOTOS:  # those shipped with scikit-image (others would need a download)
        try:
            img = np.asarray(getattr(data, name)())
        except (ImportError, AttributeError, OSError):  # one that needs a download (pooch) or is missing
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        pictures.append(img[..., :3].astype(np.uint8))
        names.append(name)
    if not pictures:
        return _synthetic(count, seed), "d3.data.synthetic scenes (no scikit-image photograph could be loaded)"
    pictures = [pictures[i % len(pictures)] for i in range(count)]
    return pictures, "scikit-image sample photographs (" + ", ".join(names[i % len(names)] for i in range(count)) + ")"


def _synthetic(count: int, seed: int) -> list[np.ndarray]:
    from d3.data.synthetic import render_scene

    return [render_scene(seed + i, 192, 256, supersample=2).rgb for i in range(count)]


def write_photos(folder: Path, count: int, resolution: int, seed: int = 0) -> tuple[str, list[str]]:
    """JPEGs of mixed sizes and aspect ratios (centre-cropped, then upscaled past the processing resolution)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pictures, source = _source_images(count, seed)
    sizes = []
    for i, arr in enumerate(pictures):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        h, w = arr.shape[:2]
        crop_w, crop_h = (w, round(w * ah / aw)) if w * ah <= h * aw else (round(h * aw / ah), h)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        long_side = round(resolution * UPSCALE[(i + i // len(ASPECTS)) % len(UPSCALE)])
        size = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
        img = Image.fromarray(arr[top : top + crop_h, left : left + crop_w]).resize(size, Image.BICUBIC)
        img.save(folder / f"photo_{i:02d}.jpg", quality=92)
        sizes.append(f"{size[0]}x{size[1]}")
    return source, sizes


# ------------------------------------------------------------------------------------------------------- peers
def build_marigold(predictor, backbone: Path, seed: int):
    """diffusers' Marigold depth pipeline around an 8-input-channel UNet of d3's UNet's config and d3's VAE."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from d3.tiny import SD21_SCHEDULER

    torch.manual_seed(seed)
    config = dict(predictor.unet.config)
    config["in_channels"] = 8
    unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_config(dict(SD21_SCHEDULER, timestep_spacing="trailing"))
    pipe = MarigoldDepthPipeline(unet=unet, vae=predictor.vae, scheduler=scheduler,
                                 text_encoder=CLIPTextModel.from_pretrained(backbone / "text_encoder").eval(),
                                 tokenizer=CLIPTokenizer.from_pretrained(backbone / "tokenizer"),
                                 prediction_type="depth", default_denoising_steps=1,
                                 default_processing_resolution=predictor.config.processing_res)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_marigold(pipe, files: list[Path], output: Path, resolution: int, seed: int) -> int:
    from d3.io import load_rgb
    from d3.outputs import write_outputs

    generator = torch.Generator().manual_seed(seed)
    for f in files:
        image = load_rgb(f)
        with torch.no_grad():
            out = pipe(image, num_inference_steps=1, ensemble_size=1, processing_resolution=resolution,
                       generator=generator, output_type="np")
        write_outputs(output / f.stem, "depth", np.asarray(out.prediction[0, ..., 0], dtype=np.float32))
    return len(files)


@torch.no_grad()
def run_authors(predictor, files: list[Path], output: Path, resolution: int, seed: int) -> int:
    """The authors' inference as described: squash, sample the posterior, one pass, decode, mean, resize back."""
    from PIL import Image

    from d3.outputs import colorize_depth

    generator = torch.Generator().manual_seed(seed)
    unet, vae = predictor.unet, predictor.vae
    t = torch.tensor([predictor.config.student_timestep])
    output.mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as img:
            rgb = np.array(img.convert("RGB"))
        height, width = rgb.shape[:2]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous().float() / 127.5 - 1  # NCHW, as ToTensor
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        latent = vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor
        pred = unet(latent, t, encoder_hidden_states=predictor.prompt_embeds).sample
        decoded = vae.decode(pred / vae.config.scaling_factor).sample
        depth = (decoded.mean(1, keepdim=True) * 0.5 + 0.5).clamp(0, 1)
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        Image.fromarray(colorize_depth(depth.numpy())).save(output / f"{f.stem}_depth_colored.png")
    return len(files)


# ---------------------------------------------------------------------------------------------------- measures
def gemm_peak_flops(n: int = 2048, reps: int = 4) -> float:
    """The best of `reps` fp32 n x n x n matmuls on this CPU with the current torch threads, in FLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def padding_check(predictor, files: list[Path], resolution: int, rounds: int) -> dict:
    """d3's model on each image's keep-aspect size padded to the UNet's full multiple (64 for SD, what d3 padded to
    before) against the VAE's factor (8 for SD, what d3 and Marigold pad to: diffusers' UNet upsamples to the skip
    connections' sizes), alternated."""
    from d3.io import load_rgb
    from d3.latents import unet_size_multiple, vae_scale_factor

    big, small = unet_size_multiple(predictor.unet, predictor.vae), vae_scale_factor(predictor.vae)

    shapes = []
    for f in files:
        h, w = load_rgb(f).shape[:2]
        h, w = predictor._processing_size(h, w, resolution, "keep_aspect")
        shapes.append((h, w))
    seconds = {big: 0.0, small: 0.0}
    pixels = {big: 0, small: 0}
    inputs = {m: [torch.zeros(1, 3, -(-h // m) * m, -(-w // m) * m) for h, w in shapes] for m in seconds}
    predictor.predict_tensor(inputs[small][0])  # warm-up
    for r in range(max(1, rounds)):
        for m in ((big, small) if r % 2 == 0 else (small, big)):
            for x in inputs[m]:
                start = time.perf_counter()
                predictor.predict_tensor(x)
                seconds[m] += time.perf_counter() - start
                pixels[m] += x.shape[-1] * x.shape[-2]
    return {"resolution": resolution, "shapes": shapes, "multiples": (big, small), "seconds_d3_padding": seconds[big],
            "seconds_vae_padding": seconds[small], "time_ratio": seconds[big] / seconds[small],
            "pixel_ratio": pixels[big] / pixels[small]}


def main(argv: list[str] | None = None) -> dict:
    import infer
    from benchmarks.inference import ensure_checkpoint
    from d3.io import find_images, load_rgb
    from d3.predictor import D3Predictor

    args = parse_args(argv)
    res = args.resolution = args.resolution or default_resolution(args.backbone)
    set_threads(args.num_threads)
    device = torch.device("cpu")
    backbone = ensure_backbone(args.backbone, args.cache_dir, args.backbone_dir)
    checkpoint = ensure_checkpoint(argparse.Namespace(checkpoint=None, backbone=args.backbone,
                                                      backbone_dir=args.backbone_dir, cache_dir=args.cache_dir,
                                                      task="depth"))
    predictor = D3Predictor.from_pretrained(checkpoint, device="cpu", dtype="fp32", task="depth")
    marigold = build_marigold(predictor, backbone, args.seed)

    work = Path(tempfile.mkdtemp(prefix="d3-bench-peers-"))
    try:
        source, sizes = write_photos(work / "input", args.num_images, res, args.seed)
        files = find_images(work / "input")
        (work / "warmup").mkdir()
        shutil.copy(files[0], work / "warmup" / files[0].name)
        flags = ["--checkpoint", str(checkpoint), "--processing_res", str(res), "--batch_size", "1",
                 "--dtype", "fp32", "--device", "cpu"]
        # d3's network inputs for these images, for its model-only figure and its FLOP count
        # (contiguous NCHW as infer.py's batching makes them: the HWC-strided views would run the whole network in
        # channels_last, 2-3x slower on this CPU in fp32)
        inputs = [predictor.preprocess(load_rgb(f), res, "keep_aspect")[0][None].contiguous() for f in files]

        def d3_run(folder: Path, out: Path, *extra: str) -> int:
            code = infer.main(["--input", str(folder), "--output", str(out), *flags, *extra], predictor=predictor)
            if code != 0:
                raise SystemExit(f"error: infer.py failed (exit {code})")
            return len(find_images(folder))

        def model_only(_folder: Path, _out: Path) -> int:
            for x in inputs:
                predictor.predict_tensor(x)
            return len(inputs)

        sides = {
            D3: d3_run,
            D3_THREADED: lambda folder, out: d3_run(folder, out, "--workers", "1"),
            MARIGOLD: lambda folder, out: run_marigold(marigold, find_images(folder), out, res, args.seed),
            AUTHORS: lambda folder, out: run_authors(predictor, find_images(folder), out, res, args.seed),
        }
        model_side = "d3 model only (encode + UNet + decode, no files)"
        every = {**sides, model_side: model_only}
        for i, fn in enumerate(every.values()):  # untimed: the first call of each (allocations, Marigold's prompt)
            fn(work / "warmup", work / f"warmup-out-{i}")

        flops = peak = None
        if not args.no_flops:
            by_shape: dict[tuple, float] = {}
            for x in inputs:
                if x.shape not in by_shape:
                    by_shape[x.shape] = count_flops(lambda x=x: predictor.predict_tensor(x))
            flops = sum(by_shape[x.shape] for x in inputs)  # over the image set
            peak = gemm_peak_flops()

        meters = {name: PeakMemory(device) for name in every}
        baseline = meters[D3].baseline
        for meter in meters.values():
            meter.baseline = baseline
        seconds = dict.fromkeys(every, 0.0)
        written = {}
        names = list(every)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotating order
                out = work / f"output-{r}-{names.index(name)}"
                with meters[name]:
                    start = time.perf_counter()
                    every[name](work / "input", out)
                    spent = time.perf_counter() - start
                seconds[name] += spent
                print(f"[peers] round {r + 1}/{args.rounds}: {name}: {spent:.1f} s", file=sys.stderr, flush=True)
                if name != model_side:
                    written[name] = len(list(out.rglob("*_depth_colored.png")))
                shutil.rmtree(out, ignore_errors=True)
        pad = padding_check(predictor, files, args.padding_check_res, args.rounds) if args.padding_check_res else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timed = len(files) * args.rounds
    rows = {name: Row(name, seconds[name], timed, meters[name].peak) for name in every}
    d3_ips = rows[D3].images_per_s
    speedups = {name: d3_ips / rows[name].images_per_s for name in (MARIGOLD, AUTHORS)}
    e2e_vs_model = d3_ips / rows[model_side].images_per_s
    ratios = {f"{name}: images/s relative to d3's": f"{rows[name].images_per_s / d3_ips:.2f} "
              f"(d3 is {d3_ips / rows[name].images_per_s:.2f}x)" for name in PEERS}
    ratios["d3 end to end / d3 model only (images/s)"] = f"{e2e_vs_model:.2f}"
    ratios[f"{D3_THREADED} / {D3} (images/s)"] = f"{rows[D3_THREADED].images_per_s / d3_ips:.2f}"
    extra = ["files written per round: " + ", ".join(f"{n}: {written[n]}" for n in (*PEERS, D3_THREADED))
             + " (the authors' procedure writes only the colour PNG)"]
    result = {name: {"images_per_s": r.images_per_s, "ms_per_image": r.ms_per_image,
                     "peak_memory_bytes": r.peak_bytes} for name, r in rows.items()}
    if flops:
        achieved_model = flops * args.rounds / seconds[model_side]
        achieved_e2e = flops * args.rounds / seconds[D3]
        extra += [(f"counted FLOPs (VAE encode + UNet + VAE decode): {flops / len(files) / 1e9:.1f} GFLOP per "
                   "image on average over these images"),
                  f"CPU fp32 GEMM peak (2048^3 torch.mm, best of 4): {peak / 1e9:.1f} GFLOP/s",
                  (f"d3 achieved: model only {achieved_model / 1e9:.1f} GFLOP/s = {achieved_model / peak:.0%} of the "
                   f"GEMM peak; end to end {achieved_e2e / 1e9:.1f} GFLOP/s = {achieved_e2e / peak:.0%}")]
        result.update(gflop_per_image=flops / len(files) / 1e9, gemm_peak_gflops=peak / 1e9,
                      efficiency_model=achieved_model / peak, efficiency_e2e=achieved_e2e / peak)
    if pad:
        extra.append(f"padding check at processing resolution {pad['resolution']} (shapes {pad['shapes']}): d3's "
                     f"model on inputs padded to multiples of {pad['multiples'][0]} (as d3 padded before) takes "
                     f"{pad['time_ratio']:.2f}x the time of multiples of {pad['multiples'][1]} (as d3 and Marigold "
                     f"pad; {pad['pixel_ratio']:.2f}x the pixels)")
    extra += goal_lines(True, [(f"d3 / {name} end to end (images/s)", s, ">=", 1.05) for name, s in speedups.items()]
                        + [("d3 end to end / model only", e2e_vs_model, ">=", 0.95)])
    setting = {"backbone": args.backbone_dir or f"{args.backbone} (random weights)", "checkpoint": checkpoint,
               "precision": "fp32", "resolution": res, "batch size": 1,
               "images": f"{len(files)} JPEGs, {source}; sizes (WxH) " + ", ".join(sizes),
               "timed": f"{args.rounds} rounds, peers alternating in rotating order, after one untimed image each"}
    print_table("d3 side by side with its peers", describe_device(device), setting, list(rows.values()), ratios,
                meters[D3].label, extra)
    result.update(speedups=speedups, ratio_e2e_model=e2e_vs_model,
                  ratio_threaded=rows[D3_THREADED].images_per_s / d3_ips, written=written, images=len(files),
                  source=source, padding=pad)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
