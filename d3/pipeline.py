"""`D3Pipeline`: a d3 model as a diffusers pipeline, for users who work in the diffusers ecosystem.

    from d3.pipeline import D3Pipeline
    pipe = D3Pipeline.from_pretrained("d3-depth")      # a saved pipeline, our checkpoint folder, or a hub id of either
    out = pipe(Image.open("photo.jpg"))
    out.prediction                                     # (1, H, W, 1) float32 relative depth in [0, 1], near = 0
    pipe.image_processor.visualize_depth(out.prediction)[0].save("depth.png")

The output follows Marigold's diffusers pipelines (`prediction` as (N, H, W, C) arrays, `image_processor.visualize_*`
helpers). The pipeline holds only its components and config; every call wraps them in a `D3Predictor` and runs its
`predict`, so the pipeline, `infer.py` and `evaluate.py` share one pre/post-processing path and give the same bytes.

A saved pipeline folder is also a d3 checkpoint folder (`d3_config.json`, `unet/`, `vae/`, `prompt_embeds.safetensors`,
plus `model_index.json` and a `README.md` model card), so `infer.py --checkpoint` reads it as it is.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file

from .io import load_rgb, to_uint8_rgb
from .loading import load_predictor
from .model_card import model_card
from .outputs import colorize_depth, normal_to_rgb, to_uint16
from .checkpoint import RESIZE_MODES, TASKS, CheckpointError, D3Config, prompt_embeds_mismatch, resolve_checkpoint
from .predictor import D3Predictor

@dataclass
class D3PipelineOutput(BaseOutput):
    """
    prediction: (N, H, W, C) float32 numpy (or (N, C, H, W) torch for `output_type="pt"`) at the input size; C = 1
        for depth and matting, 3 for normals. Inputs of different sizes give a list of (H, W, C) / (C, H, W) instead.
    """

    prediction: np.ndarray | torch.Tensor | list


# -- inputs ---------------------------------------------------------------------------------------------------------
def _from_array(a: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (np.isfinite(a).all() and 0.0 <= lo and hi <= 1.0):
            raise ValueError(f"{what}: a float image must lie in [0, 1], got values in [{lo}, {hi}]")
        return np.round(a * 255).astype(np.uint8)  # the predictor's input is 8-bit, as files are
    raise ValueError(f"{what}: expected uint8, or float in [0, 1], got {a.dtype}")


def _as_images(item: Any, what: str = "image") -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays, read the way infer.py reads files (EXIF orientation, alpha on white, 16-bit, ...)."""
    from PIL import ImageOps

    if isinstance(item, (list, tuple)):
        return [img for i, x in enumerate(item) for img in _as_images(x, f"{what}[{i}]")]
    if isinstance(item, (str, os.PathLike)):
        return [load_rgb(item)]
    if isinstance(item, PIL.Image.Image):
        return [to_uint8_rgb(ImageOps.exif_transpose(item))]
    if torch.is_tensor(item):
        t = item.detach().cpu()
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{what}: expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(item.shape)}")
        return [_from_array(a, f"{what}[{i}]") for i, a in enumerate(t.permute(0, 2, 3, 1).numpy())]
    if isinstance(item, np.ndarray):
        if item.ndim == 4:
            return [_from_array(a, f"{what}[{i}]") for i, a in enumerate(item)]
        return [_from_array(item, what)]
    raise TypeError(f"{what}: expected a PIL image, numpy array, torch tensor or file path, got {type(item).__name__}")


# -- outputs --------------------------------------------------------------------------------------------------------
def _maps(prediction: Any, what: str) -> list[np.ndarray]:
    """Per image (H, W) or (H, W, 3) float arrays from any form `D3Pipeline` returns (or a single map)."""
    if isinstance(prediction, (list, tuple)):
        return [m for p in prediction for m in _maps(p, what)]
    if torch.is_tensor(prediction):
        t = prediction.detach().float().cpu()
        t = t[None] if t.ndim == 3 else t
        if t.ndim == 2:
            return [t.numpy()]
        if t.ndim != 4:
            raise ValueError(f"{what}: expected (N, C, H, W) or (C, H, W), got {tuple(prediction.shape)}")
        prediction = t.permute(0, 2, 3, 1).numpy()
    a = np.asarray(prediction, dtype=np.float32)
    if a.ndim == 2:
        return [a]
    if a.ndim == 3:
        a = a[None] if a.shape[-1] in (1, 3) else a[..., None]  # one (H, W, C) map, or N depth maps (N, H, W)
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected (N, H, W, 1|3), (H, W, 1|3) or (H, W), got {np.shape(prediction)}")
    return [m[..., 0] if m.shape[-1] == 1 else m for m in a]


class D3ImageProcessor:
    """Predictions to pictures, named after Marigold's helpers and identical to the files `infer.py` writes."""

    @staticmethod
    def visualize_depth(depth: Any, color_map: str = "Spectral") -> list[PIL.Image.Image]:
        return [PIL.Image.fromarray(colorize_depth(d, color_map)) for d in _maps(depth, "depth")]

    @staticmethod
    def export_depth_to_16bit_png(depth: Any) -> list[PIL.Image.Image]:
        """round(d * 65535) as 16-bit greyscale."""
        return [PIL.Image.fromarray(to_uint16(d)) for d in _maps(depth, "depth")]

    @staticmethod
    def visualize_normals(normals: Any) -> list[PIL.Image.Image]:
        """(n + 1) / 2 as RGB, in the output's camera frame (x right, y up, z toward the camera)."""
        maps = _maps(normals, "normals")
        if any(m.ndim != 3 for m in maps):
            raise ValueError("normals: expected 3 channels")
        return [PIL.Image.fromarray(normal_to_rgb(n)) for n in maps]

    @staticmethod
    def visualize_alpha(alpha: Any) -> list[PIL.Image.Image]:
        """8-bit greyscale matte."""
        return [PIL.Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in _maps(alpha, "alpha")]

    @staticmethod
    def export_alpha_to_16bit_png(alpha: Any) -> list[PIL.Image.Image]:
        return [PIL.Image.fromarray(to_uint16(a)) for a in _maps(alpha, "alpha")]

    @staticmethod
    def cutout(image: Any, alpha: Any) -> list[PIL.Image.Image]:
        """The input images with the 8-bit matte as their alpha channel (RGBA)."""
        images, mattes = _as_images(image), D3ImageProcessor.visualize_alpha(alpha)
        if len(images) != len(mattes):
            raise ValueError(f"cutout: {len(images)} images but {len(mattes)} mattes")
        return [PIL.Image.fromarray(np.concatenate([img, np.asarray(m)[..., None]], axis=2))
                for img, m in zip(images, mattes)]


# -- the pipeline ---------------------------------------------------------------------------------------------------
def _read_prompt_embeds(folder: Path) -> torch.Tensor:
    file = folder / "prompt_embeds.safetensors"
    try:
        return load_file(str(file))["prompt_embeds"]
    except Exception as err:
        raise CheckpointError(f"{file}: missing, unreadable or without 'prompt_embeds' ({err})") from None


class D3Pipeline(DiffusionPipeline):
    """One-step, noise-free dense prediction (D³-Predictor): depth, surface normals or alpha mattes.

    Components: `unet` (the student) and `vae`; no text encoder (the task prompt is embedded once, `prompt_embeds`).
    Config: the fields of `d3_config.json` (task, student timestep, prompt, processing resolution, resize mode,
    base model).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        task: str = "depth",
        student_timestep: float = 261.0,
        prompt: str = "",
        processing_res: int = 768,
        resize_mode: str = "keep_aspect",
        base_model: str = "",
        prompt_embeds: torch.Tensor | None = None,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
        self.register_modules(unet=unet, vae=vae)
        self.register_to_config(task=task, student_timestep=float(student_timestep), prompt=prompt,
                                processing_res=int(processing_res), resize_mode=resize_mode, base_model=base_model)
        self.prompt_embeds = prompt_embeds
        self.image_processor = D3ImageProcessor()

    # -- the shared code path ---------------------------------------------------------------------------------------
    @property
    def d3_config(self) -> D3Config:
        c = self.config
        return D3Config(task=c["task"], student_timestep=c["student_timestep"], prompt=c["prompt"],
                        processing_res=c["processing_res"], resize_mode=c["resize_mode"], base_model=c["base_model"])

    @property
    def predictor(self) -> D3Predictor:
        """The components as a D3Predictor on their current device and dtype (cheap: nothing is copied)."""
        if self.prompt_embeds is None:
            raise ValueError("this D3Pipeline has no prompt_embeds; load it with D3Pipeline.from_pretrained")
        mismatch = prompt_embeds_mismatch(self.prompt_embeds, self.unet)
        if mismatch:
            raise ValueError(mismatch)
        return D3Predictor(self.unet, self.vae, self.prompt_embeds, self.d3_config, device=self.device,
                           dtype=self.unet.dtype)

    @classmethod
    def from_predictor(cls, predictor: D3Predictor) -> D3Pipeline:
        # (architecture / lora_adapter: this pipeline holds a UNet student, the default "unet" with full weights)
        fields = {k: v for k, v in asdict(predictor.config).items()
                  if k not in ("format_version", "architecture", "lora_adapter")}
        return cls(unet=predictor.unet, vae=predictor.vae, prompt_embeds=predictor.prompt_embeds.float().cpu(),
                   **fields)

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        processing_res: int | None = None,
        resize_mode: str | None = None,
        batch_size: int = 1,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> D3PipelineOutput | tuple:
        """Predict for a PIL image, a numpy array ((H, W, 3) uint8 or float in [0, 1], or (N, H, W, 3)), a torch
        tensor ((N, 3, H, W)), a file path, or a list of these. One UNet evaluation per image, deterministic.

        processing_res: long side of the network input (default: the config's; 0 = native size).
        resize_mode: "keep_aspect" (default) or "squash" (the authors' square input).
        output_type: "np" -> (N, H, W, C) float32; "pt" -> (N, C, H, W) float32 tensors.
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type {output_type!r}: expected 'np' or 'pt'")
        if resize_mode is not None and resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
        images = _as_images(image)
        if not images:
            raise ValueError("image: nothing to predict (an empty list)")
        show = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        outputs = self.predictor.predict(images, processing_res=processing_res, batch_size=batch_size,
                                         show_progress=show and len(images) > 1, resize_mode=resize_mode)
        maps = [p[..., None] if p.ndim == 2 else p for p in outputs]  # (H, W, C)
        if output_type == "pt":
            maps = [torch.from_numpy(m).permute(2, 0, 1) for m in maps]
            same = len({tuple(m.shape) for m in maps}) == 1
            prediction = torch.stack(maps) if same else maps
        else:
            same = len({m.shape for m in maps}) == 1
            prediction = np.stack(maps) if same else maps
        return D3PipelineOutput(prediction=prediction) if return_dict else (prediction,)

    # -- loading and saving -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> D3Pipeline:
        """A folder written by `save_pretrained`, a d3 checkpoint folder, the authors' `.pth` (pass `base_model=`
        the SD 2.1 base for its VAE and prompt), or a hub id of a folder. `task=` checks the loaded task."""
        task = kwargs.pop("task", None)
        base_model = kwargs.pop("base_model", None)
        path = resolve_checkpoint(pretrained_model_name_or_path, revision=kwargs.get("revision"))
        if path.is_file() or not (path / "model_index.json").exists():
            dtype = kwargs.get("torch_dtype")
            predictor = load_predictor(path, device="cpu", task=task, pretrained_model_name_or_path=base_model,
                                       dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
            return cls.from_predictor(predictor)
        pipe = super().from_pretrained(path, **kwargs)
        if task is not None and task != pipe.config["task"]:
            raise CheckpointError(f"{path}: this pipeline predicts {pipe.config['task']!r}, not {task!r}")
        if pipe.prompt_embeds is None:
            pipe.prompt_embeds = _read_prompt_embeds(path)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """A hub-ready folder: diffusers' layout plus `d3_config.json`, `prompt_embeds.safetensors` and a model card.

        With `push_to_hub=True` it is uploaded (`repo_id`, `private`, `token`, `commit_message` as in diffusers).
        """
        if not safe_serialization or variant is not None:
            raise ValueError("d3 checkpoints are plain safetensors folders (no pickle, no weight variants)")
        if self.prompt_embeds is None:
            raise ValueError("this D3Pipeline has no prompt_embeds to save")
        path = Path(save_directory)
        super().save_pretrained(path, safe_serialization=True, max_shard_size=kwargs.pop("max_shard_size", None))
        save_file({"prompt_embeds": self.prompt_embeds.detach().float().cpu().contiguous()},
                  str(path / "prompt_embeds.safetensors"))
        self.d3_config.write(path)
        (path / "README.md").write_text(model_card(self.d3_config))
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            token = kwargs.get("token")
            repo_id = create_repo(kwargs.get("repo_id", path.name), exist_ok=True, private=kwargs.get("private"),
                                  token=token).repo_id
            upload_folder(repo_id=repo_id, folder_path=str(path), token=token,
                          commit_message=kwargs.get("commit_message", "Upload D3Pipeline"),
                          create_pr=kwargs.get("create_pr", False))
