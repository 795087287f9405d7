"""The front page's picture: one real photograph and a tiny d3 model's depth, normals and matte of it, in one PNG.

    python docs/make_figure.py                       # writes docs/figure.png (4.5 CPU minutes, one thread)
    python docs/make_figure.py --output /tmp/f.png --teach_steps 2 --train_steps 2 --num_scenes 8   # a smoke run

What it runs is the quick start, for all three tasks, through the project's own commands (each a subprocess, as a
user would type it): `python -m d3.tiny` builds the tiny SD-style backbone and teaches its VAE to draw RGB, depth,
normal and alpha maps; `python -m d3.data.synthetic` writes procedural training scenes; `train_depth.py`,
`train_normal.py` and `train_matting.py` train one student each, from the same backbone, on the CPU;
`infer.py` predicts the photograph with each. The panel is photo | depth | normals | matte, the maps as
infer.py writes them (`_depth_colored.png`, `_normal.png`, `_alpha.png`).

The photograph is matplotlib's sample image `grace_hopper.jpg` (a U.S. Navy portrait of Grace Hopper, public domain),
shipped with matplotlib, which requirements.txt installs: nothing is downloaded. Any other photo: `--photo PATH`.

This is not the paper's model: the backbone is a random 2.2 M-parameter UNet whose students see a few hundred
64×64 synthetic rooms for a few minutes; the figure shows what the pipeline writes, not what D³ can do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = (  # (recipe script, task, the infer.py file shown, label)
    ("train_depth.py", "depth", "_depth_colored.png", "depth"),
    ("train_normal.py", "normal", "_normal.png", "normals"),
    ("train_matting.py", "matting", "_alpha.png", "matte"),
)


def default_photo() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python docs/make_figure.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "docs" / "figure.png"), help="the PNG to write")
    p.add_argument("--photo", default=None, help="the photograph (default: matplotlib's grace_hopper.jpg)")
    p.add_argument("--workdir", default=None, help="where the backbone, scenes and models go (default: a temporary "
                   "folder, removed at the end); kept, and a model finished there is not trained again")
    p.add_argument("--teach_steps", type=int, default=150, help="steps teaching the tiny VAE")
    p.add_argument("--train_steps", type=int, default=100, help="training steps of each student")
    p.add_argument("--num_scenes", type=int, default=64, help="synthetic training scenes")
    p.add_argument("--processing_res", type=int, default=128, help="long side of the network input for the photo")
    p.add_argument("--height", type=int, default=200, help="height of each tile of the panel, pixels")
    args = p.parse_args(argv)
    for flag in ("teach_steps", "train_steps", "num_scenes", "processing_res", "height"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    return args


def run(command: list[str], env: dict) -> None:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"error: exit status {done.returncode}: {' '.join(command)}")
    print(f"{time.perf_counter() - start:6.1f} s  {' '.join(command[1:4])} ...", flush=True)


def compose(tiles: list[tuple[str, Path]], height: int, output: Path) -> None:
    """One row of tiles, each `height` pixels high at its own aspect, with its label above it."""
    from PIL import Image, ImageDraw, ImageFont

    images = []
    for _, path in tiles:
        image = Image.open(path).convert("RGB")
        images.append(image.resize((round(image.width * height / image.height), height), Image.BICUBIC))
    label_h, gap = 22, 4
    panel = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), height + label_h), "white")
    draw = ImageDraw.Draw(panel)
    try:
        font = ImageFont.load_default(size=15)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    x = 0
    for (label, _), image in zip(tiles, images):
        panel.paste(image, (x, label_h))
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        draw.text((x + (image.width - right - left) / 2, (label_h - bottom - top) / 2), label, fill="black", font=font)
        x += image.width + gap
    output.parent.mkdir(parents=True, exist_ok=True)
    panel.save(output, optimize=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    photo = Path(args.photo) if args.photo else default_photo()
    if not photo.is_file():
        sys.exit(f"error: --photo: {photo}: no such file")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    py = sys.executable
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="d3-figure-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        backbone, scenes, photos = work / "tiny", work / f"scenes-{args.num_scenes}", work / "photo"
        settings = json.dumps({k: getattr(args, k) for k in ("teach_steps", "train_steps", "num_scenes")})
        photos.mkdir(exist_ok=True)
        shutil.copyfile(photo, photos / photo.name)
        run([py, "-m", "d3.tiny", "--output", str(backbone), "--teach_vae_steps", str(args.teach_steps),
             "--teach_vae_encoder", "--teach_vae_maps", "rgb", "depth", "normal", "alpha",
             "--teach_vae_scenes", "128"], env)
        run([py, "-m", "d3.data.synthetic", "--output", str(scenes), "--num_scenes", str(args.num_scenes),
             "--quiet"], env)
        tiles = [("photograph", photo)]
        for script, task, suffix, label in TASKS:
            model = work / f"d3-{task}"
            record = work / f"d3-{task}.json"  # a model finished with the same settings (a kept --workdir) is reused
            if not (record.is_file() and record.read_text() == settings and (model / "d3_config.json").is_file()):
                shutil.rmtree(model, ignore_errors=True)
                run([py, script, "--pretrained_model_name_or_path", str(backbone), "--dataset", str(scenes),
                     "--output_dir", str(model), "--resolution", "64", "--train_batch_size", "4",
                     "--gradient_accumulation_steps", "1", "--max_train_steps", str(args.train_steps),
                     "--learning_rate", "6e-4", "--lr_warmup_steps", "0", "--checkpointing_steps", "100000",
                     "--dataloader_num_workers", "0", "--report_to", "none"], env)
                record.write_text(settings)
            run([py, "infer.py", "--input", str(photos), "--checkpoint", str(model), "--output", str(work / task),
                 "--processing_res", str(args.processing_res)], env)
            tiles.append((label, work / task / f"{photo.stem}{suffix}"))
        compose(tiles, args.height, Path(args.output))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
