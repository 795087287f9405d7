"""The trained model for inference: the d3 checkpoint folder and the one-step, deterministic predictor.

Checkpoint folder (DESIGN.md)::

    d3_config.json             task, student timestep, prompt, processing resolution, resize mode, base model, version
    unet/                      diffusers UNet2DConditionModel (safetensors)
    vae/                       diffusers AutoencoderKL (safetensors)
    prompt_embeds.safetensors  the fixed text conditioning ("prompt_embeds")

It loads with no text encoder and no network, and only through safetensors (nothing is unpickled).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .backbone import decode_latent, encode_image, unet_size_multiple

FORMAT_VERSION = 1
TASKS = ("depth", "normal", "matting")
RESIZE_MODES = ("keep_aspect", "squash")
PROMPTS = {
    "depth": "A grayscale depth estimation image, where darker areas represent closer depths and lighter areas "
    "indicate farther depths.",
    "normal": "A surface normal estimation map.",
    "matting": "A human portrait matting map.",
}


class CheckpointError(ValueError):
    """A checkpoint folder is missing something or does not match its config; the message names the file."""


@dataclass
class D3Config:
    task: str
    student_timestep: float = 261.0
    prompt: str = ""
    processing_res: int = 768
    resize_mode: str = "keep_aspect"
    base_model: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, path: Path) -> D3Config:
        file = path / "d3_config.json"
        if not file.exists():
            raise CheckpointError(f"{file}: missing; expected a d3 checkpoint folder (d3_config.json, unet/, vae/, "
                                  "prompt_embeds.safetensors)")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{file}: unknown keys {unknown}")
        if "task" not in data:
            raise CheckpointError(f"{file}: no 'task' (expected one of {TASKS})")
        config = cls(**data)
        if config.task not in TASKS:
            raise CheckpointError(f"{file}: task {config.task!r} is not one of {TASKS}")
        if config.resize_mode not in RESIZE_MODES:
            raise CheckpointError(f"{file}: resize_mode {config.resize_mode!r} is not one of {RESIZE_MODES}")
        if config.format_version > FORMAT_VERSION:
            raise CheckpointError(f"{file}: format version {config.format_version} is newer than this d3 "
                                  f"({FORMAT_VERSION}); update d3")
        return config

    def write(self, path: Path) -> None:
        (path / "d3_config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def save_checkpoint(path: str | Path, unet, vae, prompt_embeds: torch.Tensor, config: D3Config) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    save_file({"prompt_embeds": prompt_embeds.detach().float().cpu().contiguous()}, str(path / "prompt_embeds.safetensors"))
    config.write(path)
    return path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision where the hardware does it well; fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def cast_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model, casting only when the dtype really changes (diffusers warns on every `.to(dtype)`)."""
    module = module.to(device)
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _load_model(cls, folder: Path, what: str):
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: missing {what} (expected a diffusers {cls.__name__} folder)")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no .safetensors weights for the {what}")
    try:
        return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises several types on mismatching weights
        raise CheckpointError(f"{folder}: {what} weights do not match its config ({str(err).splitlines()[0]})") from None


class D3Predictor:
    """One UNet evaluation per image: clean latent in, task latent out, decoded by the VAE."""

    def __init__(self, unet, vae, prompt_embeds: torch.Tensor, config: D3Config, device=None, dtype=None):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(self.device))
        self.unet = cast_module(unet, self.device, self.dtype).eval().requires_grad_(False)
        self.vae = cast_module(vae, self.device, self.dtype).eval().requires_grad_(False)
        self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        self.size_multiple = unet_size_multiple(self.unet, self.vae)

    @property
    def task(self) -> str:
        return self.config.task

    # -- loading and saving -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None, task: str | None = None) -> D3Predictor:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder")
        config = D3Config.read(path)
        if task is not None and task != config.task:
            raise CheckpointError(f"{path / 'd3_config.json'}: this checkpoint predicts {config.task!r}, not {task!r}")
        embeds_file = path / "prompt_embeds.safetensors"
        if not embeds_file.exists():
            raise CheckpointError(f"{embeds_file}: missing (the fixed prompt conditioning)")
        try:
            prompt_embeds = load_file(str(embeds_file))["prompt_embeds"]
        except Exception as err:
            raise CheckpointError(f"{embeds_file}: unreadable or without 'prompt_embeds' ({err})") from None
        unet = _load_model(UNet2DConditionModel, path / "unet", "UNet")
        vae = _load_model(AutoencoderKL, path / "vae", "VAE")
        cross = unet.config.cross_attention_dim
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != cross:
            raise CheckpointError(f"{embeds_file}: prompt_embeds of shape {tuple(prompt_embeds.shape)} do not fit "
                                  f"the UNet (expected (1, L, {cross}))")
        return cls(unet, vae, prompt_embeds, config, device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.unet, self.vae, self.prompt_embeds, self.config)

    # -- tensors ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tensor(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1], H and W multiples of `size_multiple` -> decoded (B,3,H,W), nominally in [-1,1]."""
        rgb = rgb.to(self.device, self.dtype)
        latents = encode_image(self.vae, rgb)
        cond = self.prompt_embeds.expand(latents.shape[0], -1, -1)
        t = torch.tensor(self.config.student_timestep, device=self.device)
        out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=cond, return_dict=False)[0]
        return decode_latent(self.vae, out).float()

    def _processing_size(self, height: int, width: int, processing_res: int, resize_mode: str) -> tuple[int, int]:
        """Network input size: long side -> processing_res (aspect kept) or a square (squash), then multiples."""
        if resize_mode == "squash" and processing_res > 0:
            return processing_res, processing_res
        if processing_res > 0:
            scale = processing_res / max(height, width)
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
        return height, width

    def _to_output(self, decoded: torch.Tensor) -> np.ndarray:
        """Decoded (3,H,W) in [-1,1] -> the task's array (contract in DESIGN.md / README)."""
        if self.task == "normal":
            return F.normalize(decoded.clamp(-1, 1), dim=0).permute(1, 2, 0).cpu().numpy().astype(np.float32)
        return (decoded * 0.5 + 0.5).clamp(0, 1).mean(0).cpu().numpy().astype(np.float32)

    def _groups(self, sizes: list[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
        """Indices batched by identical network input size (so nothing is padded beyond the size multiple)."""
        order: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            order.setdefault(size, []).append(i)
        for members in order.values():
            for start in range(0, len(members), batch_size):
                yield members[start : start + batch_size]

    def preprocess(self, image: np.ndarray, processing_res: int, resize_mode: str) -> tuple[torch.Tensor, tuple]:
        """uint8 (H,W,3) -> padded network input (3,h',w') and what is needed to undo it."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
        h, w = self._processing_size(height, width, processing_res, resize_mode)
        if (h, w) != (height, width):
            antialias = resize_mode != "squash" and h < height  # the official squash uses plain bilinear
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # Replicated borders: the padding is cropped off again, and replication keeps its statistics neutral.
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x[0].clamp(-1, 1), (height, width, h, w)

    def postprocess(self, decoded: torch.Tensor, undo: tuple) -> np.ndarray:
        height, width, h, w = undo
        y = decoded[None, :, :h, :w]
        if (h, w) != (height, width):
            y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=height < h)
        return self._to_output(y[0])

    def predict(
        self,
        images: Sequence[np.ndarray],
        processing_res: int | None = None,
        batch_size: int = 1,
        show_progress: bool = False,
        resize_mode: str | None = None,
    ) -> list[np.ndarray]:
        """Predict for each uint8 (H,W,3) image; outputs at each input's exact size (see the README's contract)."""
        from tqdm.auto import tqdm

        res = self.config.processing_res if processing_res is None else processing_res
        mode = resize_mode or self.config.resize_mode
        prepared = [self.preprocess(img, res, mode) for img in images]
        sizes = [tuple(x.shape[-2:]) for x, _ in prepared]
        results: list[np.ndarray | None] = [None] * len(images)
        bar = tqdm(total=len(images), desc=f"{self.task}", disable=not show_progress)
        for group in self._groups(sizes, max(1, batch_size)):
            decoded = self.predict_tensor(torch.stack([prepared[i][0] for i in group]))
            for i, out in zip(group, decoded):
                results[i] = self.postprocess(out, prepared[i][1])
            bar.update(len(group))
        bar.close()
        return results  # type: ignore[return-value]


def predictor_from_backbone(backbone_path: str | Path, task: str, prompt: str | None = None, device=None,
                            dtype=None, processing_res: int = 768) -> D3Predictor:
    """An untrained predictor (student = the pretrained UNet): a baseline, and how tests get a checkpoint."""
    from .backbone import encode_prompt, load_backbone

    backbone = load_backbone(str(backbone_path))
    prompt = prompt or PROMPTS[task]
    embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, prompt)
    config = D3Config(task=task, prompt=prompt, processing_res=processing_res, base_model=str(backbone_path))
    return D3Predictor(backbone.unet, backbone.vae, embeds, config, device, dtype)
