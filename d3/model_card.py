"""The README.md model card a saved D3Pipeline carries: hub metadata, what it predicts, how to run it, its settings."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import PROMPTS, D3Config

PIPELINE_TAGS = {"depth": "depth-estimation", "normal": "image-to-image", "matting": "image-segmentation"}
OUTPUT_DOC = {
    "depth": "relative (affine-invariant) depth in [0, 1], near = 0, shape (N, H, W, 1)",
    "normal": "unit surface normals, camera frame x right, y up, z toward the camera, shape (N, H, W, 3)",
    "matting": "alpha matte in [0, 1], shape (N, H, W, 1)",
}


def hub_id(name: str) -> str | None:
    """`name` if it reads as a hub id (owner/name, not an existing local path), else None."""
    return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists() else None


def model_card(config: D3Config) -> str:
    """README.md for a saved pipeline: hub metadata, what it predicts, how to run it, its settings."""
    base = hub_id(config.base_model)
    meta = ["---", "library_name: diffusers", f"pipeline_tag: {PIPELINE_TAGS[config.task]}", "license: openrail++"]
    if base:
        meta.append(f"base_model: {base}")
    meta += ["tags:", "- d3-predictor", f"- {config.task}", "- dense-prediction", "- stable-diffusion", "---"]
    official = config.prompt == PROMPTS[config.task]
    view = {"depth": "visualize_depth", "normal": "visualize_normals", "matting": "visualize_alpha"}[config.task]
    return "\n".join(meta) + f"""

# D³-Predictor: {config.task}

A single-step, noise-free {config.task} predictor in the style of D³-Predictor (Xia et al., 2025): a Stable
Diffusion UNet that reads the clean image latent once, at a fixed timestep, and whose output latent is decoded by the
VAE into the prediction. No noise is sampled, so the same image always gives the same output.

## Usage

```python
from PIL import Image
from d3.pipeline import D3Pipeline  # the `d3` package of the d3 repository

pipe = D3Pipeline.from_pretrained("THIS_FOLDER_OR_REPO_ID")
out = pipe(Image.open("photo.jpg"))
out.prediction  # {OUTPUT_DOC[config.task]}
pipe.image_processor.{view}(out.prediction)[0].save("{config.task}.png")
```

From the command line (the folder is also a d3 checkpoint): `python infer.py --input photos/ --checkpoint THIS_FOLDER`.

## Settings

| | |
|---|---|
| task | {config.task} |
| student timestep | {config.student_timestep:g} |
| prompt | {config.prompt!r}{" (the authors' prompt)" if official else ""} |
| processing resolution | {config.processing_res} (long side; `resize_mode` {config.resize_mode}) |
| base model | {config.base_model or "unknown"} |

The image is encoded with the VAE posterior mean, and the output is resized back to the input's exact size.
Precision follows the weights you load (bf16/fp16 on a GPU is fine).

## Files

`unet/` (the student, diffusers `UNet2DConditionModel`), `vae/` (`AutoencoderKL`), `prompt_embeds.safetensors`
(the fixed text conditioning: no text encoder is needed), `d3_config.json` (the settings above),
`model_index.json` (diffusers).

## Citation

```bibtex
@article{{xia2025d3predictor,
  title   = {{D$^3$-Predictor: Noise-Free Deterministic Diffusion for Dense Prediction}},
  author  = {{Xia, Changliang and Jia, Chengyou and Luo, Minnan and Dang, Zhuohang and Shen, Xin and Ping, Bowen}},
  journal = {{arXiv preprint arXiv:2512.07062}},
  year    = {{2025}}
}}
```
"""
