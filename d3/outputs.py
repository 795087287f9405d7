"""What infer.py writes per image and task. Every file is written atomically (temporary name, then rename).

- depth:   <stem>_depth.npy (float32 H×W relative depth in [0,1], near = 0), <stem>_depth_16bit.png
           (round(d·65535)), <stem>_depth_colored.png (Spectral colour map, near = red)
- normal:  <stem>_normal.npy (float32 H×W×3 unit vectors, camera frame x right, y up, z toward the camera),
           <stem>_normal.png ((n+1)/2 as RGB)
- matting: <stem>_alpha.png (8-bit), <stem>_alpha_16bit.png, <stem>_rgba.png (the input cut out by its alpha)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import save_npy, save_png

SUFFIXES = {
    "depth": ("_depth.npy", "_depth_16bit.png", "_depth_colored.png"),
    "normal": ("_normal.npy", "_normal.png"),
    "matting": ("_alpha.png", "_alpha_16bit.png", "_rgba.png"),
}


def output_paths(base: Path, task: str) -> list[Path]:
    """The files written for one input; `base` is the output folder joined with the input's relative stem."""
    return [base.parent / f"{base.name}{suffix}" for suffix in SUFFIXES[task]]


def colorize_depth(depth: np.ndarray, cmap: str = "Spectral") -> np.ndarray:
    import matplotlib

    colored = matplotlib.colormaps[cmap](np.clip(depth, 0, 1))[..., :3]
    return (colored * 255 + 0.5).astype(np.uint8)


def normal_to_rgb(normal: np.ndarray) -> np.ndarray:
    return np.clip((normal + 1) * 0.5 * 255 + 0.5, 0, 255).astype(np.uint8)


def to_uint16(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0, 1) * 65535).astype(np.uint16)


def write_outputs(base: Path, task: str, prediction: np.ndarray, image: np.ndarray | None = None) -> list[Path]:
    """Write one prediction's files; `image` (uint8 RGB) is needed for the matting cut-out."""
    paths = output_paths(base, task)
    if task == "depth":
        save_npy(paths[0], prediction.astype(np.float32))
        save_png(paths[1], to_uint16(prediction))
        save_png(paths[2], colorize_depth(prediction))
    elif task == "normal":
        save_npy(paths[0], prediction.astype(np.float32))
        save_png(paths[1], normal_to_rgb(prediction))
    elif task == "matting":
        alpha8 = np.round(np.clip(prediction, 0, 1) * 255).astype(np.uint8)
        save_png(paths[0], alpha8)
        save_png(paths[1], to_uint16(prediction))
        if image is None:
            raise ValueError("the matting cut-out needs the input image")
        save_png(paths[2], np.concatenate([image, alpha8[..., None]], axis=2))
    else:
        raise ValueError(f"unknown task {task!r}")
    return paths
