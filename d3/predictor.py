"""The trained model for inference: the one-step, deterministic predictor.

`D3Predictor` holds the student, the VAE and the fixed prompt conditioning of a checkpoint folder (`d3.checkpoint`,
docs/inference.md, "Checkpoint format"): one denoiser evaluation per image, clean latent in, task latent out, decoded by the VAE,
with the pre- and post-processing that infer.py, evaluate.py and D3Pipeline share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import PROMPTS, CheckpointError, D3Config, load_model, load_student, prompt_embeds_mismatch, read_condition, save_checkpoint
from .denoisers import as_denoiser
from .devices import DTYPES, cast_module, compile_settings, default_dtype, resolve_device
from .latents import decode_latent, encode_image

class D3Predictor:
    """One UNet evaluation per image: clean latent in, task latent out, decoded by the VAE."""

    def __init__(self, unet, vae, prompt_embeds: torch.Tensor, config: D3Config, device=None, dtype=None):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(self.device))
        # `unet` is the student, whichever architecture (the name predates the DiTs); `denoiser` makes its calls.
        self.unet = cast_module(unet, self.device, self.dtype).eval().requires_grad_(False)
        self.vae = cast_module(vae, self.device, self.dtype).eval().requires_grad_(False)
        self.denoiser = as_denoiser(self.unet)
        if torch.is_tensor(prompt_embeds):
            self.prompt_embeds = prompt_embeds.to(self.device, self.dtype)
        else:
            self.prompt_embeds = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                                  for k, v in prompt_embeds.items()}
        self.size_multiple = self.denoiser.size_multiple(self.vae)
        self.channels_last = False
        self.compiled = False

    def speed_up(self, channels_last: bool = False, compile: bool = False,
                 compile_backend: str = "inductor") -> D3Predictor:
        """Opt-in engine settings; outputs agree with the plain model up to kernel rounding.

        channels_last: NHWC activations (faster convolutions on tensor cores). compile: torch.compile the UNet and
        the VAE, specialised per input shape; inputs are then padded to the denoiser's coarser `bucket_multiple` (64
        for SD instead of 8), so each resolution bucket (and batch size) compiles once, the first batch of a bucket
        being slow, and a new image size in a known bucket does not recompile.
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            compile_settings()
            for module in (self.unet, self.vae.encoder, self.vae.decoder):
                module.compile(backend=compile_backend, dynamic=False)
            self.size_multiple = self.denoiser.bucket_multiple(self.vae)
            self.compiled = True
        return self

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
        if config.architecture != "unet":
            return cls(load_student(path, config), load_model(AutoencoderKL, path / "vae", "VAE"),
                       read_condition(embeds_file, config.architecture), config, device, dtype)
        if not embeds_file.exists():
            raise CheckpointError(f"{embeds_file}: missing (the fixed prompt conditioning)")
        try:
            prompt_embeds = load_file(str(embeds_file))["prompt_embeds"]
        except Exception as err:
            raise CheckpointError(f"{embeds_file}: unreadable or without 'prompt_embeds' ({err})") from None
        unet = load_student(path, config) if config.lora_adapter else load_model(UNet2DConditionModel,
                                                                                     path / "unet", "UNet")
        vae = load_model(AutoencoderKL, path / "vae", "VAE")
        mismatch = prompt_embeds_mismatch(prompt_embeds, unet)
        if mismatch:
            raise CheckpointError(f"{embeds_file}: {mismatch}")
        return cls(unet, vae, prompt_embeds, config, device, dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.unet, self.vae, self.prompt_embeds, self.config)

    # -- tensors ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tensor(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1], H and W multiples of `size_multiple` -> decoded (B,3,H,W), nominally in [-1,1]."""
        rgb = rgb.to(self.device, self.dtype)
        if self.channels_last:
            rgb = rgb.contiguous(memory_format=torch.channels_last)
        latents = encode_image(self.vae, rgb)
        # A fill kernel, not a host-to-device copy: a copy would wait for the previous batch (pipelining, prefetch.py)
        t = torch.full((), float(self.config.student_timestep), device=self.device)
        out = self.denoiser(latents.to(self.dtype), t, self.prompt_embeds)
        return decode_latent(self.vae, out).float()

    def _processing_size(self, height: int, width: int, processing_res: int, resize_mode: str) -> tuple[int, int]:
        """Network input size: long side -> processing_res (aspect kept) or a square (squash), then multiples."""
        if resize_mode == "squash" and processing_res > 0:
            return processing_res, processing_res
        if processing_res > 0:
            scale = processing_res / max(height, width)
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
        return height, width

    def _finish(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded (3,H,W) in [-1,1] -> the task's map (docs/inference.md: the table of files per task), on the
        decoded tensor's device (so a pipeline can copy it back asynchronously)."""
        if self.task == "normal":
            return F.normalize(decoded.clamp(-1, 1), dim=0).permute(1, 2, 0)
        unit = (decoded * 0.5).add_(0.5).clamp_(0, 1)  # one full-resolution temporary (in place after the first)
        return unit.mean(0)

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
        # In place: for a 24-megapixel photo each full-resolution float copy is 288 MB.
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1)[None]
        h, w = self._processing_size(height, width, processing_res, resize_mode)
        if (h, w) != (height, width):
            antialias = resize_mode != "squash" and h < height  # the official squash uses plain bilinear
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # Replicated borders: the padding is cropped off again, and replication keeps its statistics neutral.
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        # The squash goes back with plain bilinear too (no antialias), exactly as the authors' code does.
        return x[0].clamp(-1, 1), (height, width, h, w, resize_mode == "squash")

    def postprocess(self, decoded: torch.Tensor, undo: tuple) -> np.ndarray:
        return self.postprocess_tensor(decoded, undo).cpu().numpy().astype(np.float32, copy=False)

    def postprocess_tensor(self, decoded: torch.Tensor, undo: tuple) -> torch.Tensor:
        """`postprocess` without leaving the device (a pipeline copies the result back asynchronously)."""
        height, width, h, w, plain = undo
        y = decoded[None, :, :h, :w]
        if (h, w) != (height, width):
            y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=height < h and not plain)
        return self._finish(y[0])

    def predict(
        self,
        images: Sequence[np.ndarray],
        processing_res: int | None = None,
        batch_size: int = 1,
        show_progress: bool = False,
        resize_mode: str | None = None,
    ) -> list[np.ndarray]:
        """Predict for each uint8 (H,W,3) image; outputs at each input's exact size (see docs/inference.md)."""
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
    """An untrained predictor (student = the pretrained UNet or DiT): a baseline, and how tests get a checkpoint."""
    from .backbone import encode_condition, load_backbone

    backbone = load_backbone(str(backbone_path))
    prompt = prompt or PROMPTS[task]
    embeds = encode_condition(backbone, prompt)
    if backbone.architecture == "unet":
        embeds = embeds["encoder_hidden_states"]
    denoiser = backbone.denoiser()
    config = D3Config(task=task, prompt=prompt, processing_res=processing_res, base_model=str(backbone_path),
                      student_timestep=denoiser.default_student_timestep, architecture=backbone.architecture)
    return D3Predictor(backbone.model, backbone.vae, embeds, config, device, dtype)
