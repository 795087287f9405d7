"""The trained model for inference: the d3 checkpoint folder and the one-step, deterministic predictor.

Checkpoint folder (README, "Checkpoint format")::

    d3_config.json             task, student timestep, prompt, processing resolution, resize mode, base model, version
    unet/                      diffusers UNet2DConditionModel (safetensors)
    vae/                       diffusers AutoencoderKL (safetensors)
    prompt_embeds.safetensors  the fixed text conditioning ("prompt_embeds")

A DiT checkpoint ("architecture": "flux" | "sd3" in d3_config.json; absent means "unet") has `transformer/` instead
of `unet/`, and its prompt_embeds.safetensors holds the model's conditioning under the forward's argument names
("encoder_hidden_states", "pooled_projections", and "guidance" for FLUX.1-dev). A LoRA student saved as an adapter
has `transformer_lora/` (or `unet_lora/`) instead, named by "lora_adapter", and loads over `base_model`'s weights.

It loads with no text encoder and no network, and only through safetensors (nothing is unpickled).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .devices import DTYPES, cast_module, default_dtype, resolve_device
from .flags import PROMPTS, RESIZE_MODES, TASKS, CheckpointError  # noqa: F401  (defined where the flags need them)
from .latents import decode_latent, encode_image

FORMAT_VERSION = 1

def prompt_embeds_mismatch(prompt_embeds: torch.Tensor, unet: torch.nn.Module) -> str | None:
    """Why a prompt embedding cannot condition this UNet, or None when it can: (1, L, cross_attention_dim)."""
    cross = unet.config.cross_attention_dim
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != cross:
        return f"prompt_embeds of shape {tuple(prompt_embeds.shape)} do not fit the UNet (expected (1, L, {cross}))"
    return None


@dataclass
class D3Config:
    task: str
    student_timestep: float = 261.0
    prompt: str = ""
    processing_res: int = 768
    resize_mode: str = "keep_aspect"
    base_model: str = ""
    format_version: int = FORMAT_VERSION
    architecture: str = "unet"  # "unet" | "flux" | "sd3" (d3.denoisers); older checkpoints have no key: a UNet
    lora_adapter: str = ""  # "" (full weights in unet/ or transformer/) or the adapter folder over base_model

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
        for f in fields(cls):  # a hand-edited value of the wrong type fails here, naming the key, not later
            value, kinds = data.get(f.name), {"float": (int, float), "int": (int,), "str": (str,)}[str(f.type)]
            if f.name in data and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise CheckpointError(f"{file}: {f.name} must be of type {f.type}, got {value!r}")
        config = cls(**data)
        if config.task not in TASKS:
            raise CheckpointError(f"{file}: task {config.task!r} is not one of {TASKS}")
        if config.resize_mode not in RESIZE_MODES:
            raise CheckpointError(f"{file}: resize_mode {config.resize_mode!r} is not one of {RESIZE_MODES}")
        if config.format_version > FORMAT_VERSION:
            raise CheckpointError(f"{file}: format version {config.format_version} is newer than this d3 "
                                  f"({FORMAT_VERSION}); update d3")
        from .denoisers import ARCHITECTURES

        if config.architecture not in ARCHITECTURES:
            raise CheckpointError(f"{file}: architecture {config.architecture!r} is not one of {ARCHITECTURES}")
        return config

    def write(self, path: Path) -> None:
        (path / "d3_config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def save_checkpoint(path: str | Path, unet, vae, prompt_embeds: torch.Tensor | dict[str, torch.Tensor],
                    config: D3Config, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder. `unet` is the student (a UNet or a DiT, or its Denoiser); its architecture is
    recorded in the config. A LoRA student is written merged, or as an adapter if `config.lora_adapter` names a
    folder. `state_dict` (the student's full weights gathered from FSDP shards) replaces the module's own."""
    from .denoisers import as_denoiser
    from .lora import has_lora, save_adapter, save_weights

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    denoiser = as_denoiser(unet)
    model = denoiser.model
    config.architecture = denoiser.architecture
    if config.lora_adapter:
        if not has_lora(model):
            raise ValueError("config.lora_adapter is set but the student has no LoRA adapter")
        save_adapter(model, path / config.lora_adapter)
    elif has_lora(model) or state_dict is not None:
        save_weights(model, path / denoiser.subfolder, state_dict)
    else:
        model.save_pretrained(path / denoiser.subfolder, safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    save_file(_condition_tensors(prompt_embeds, denoiser.architecture), str(path / "prompt_embeds.safetensors"))
    config.write(path)
    return path


def _condition_tensors(prompt_embeds, architecture: str) -> dict[str, torch.Tensor]:
    """What prompt_embeds.safetensors holds: "prompt_embeds" for a UNet (the original format), else the dict."""
    if torch.is_tensor(prompt_embeds):
        prompt_embeds = {"encoder_hidden_states": prompt_embeds}
    if architecture == "unet":
        prompt_embeds = {"prompt_embeds": prompt_embeds["encoder_hidden_states"]}
    return {k: v.detach().float().cpu().contiguous() for k, v in prompt_embeds.items()}


def read_condition(file: Path, architecture: str = "unet") -> torch.Tensor | dict[str, torch.Tensor]:
    """prompt_embeds.safetensors -> a tensor (UNet) or the DiT's conditioning dict; errors name the file."""
    from .denoisers import denoiser_class

    if not file.exists():
        raise CheckpointError(f"{file}: missing (the fixed prompt conditioning)")
    try:
        tensors = load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from None
    if architecture == "unet":
        if "prompt_embeds" not in tensors:
            raise CheckpointError(f"{file}: no 'prompt_embeds' tensor (found {sorted(tensors)})")
        return tensors["prompt_embeds"]
    missing = [k for k in denoiser_class(architecture).condition_keys if k not in tensors]
    if missing:
        raise CheckpointError(f"{file}: missing {missing} for a {architecture} checkpoint (found {sorted(tensors)})")
    return tensors


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _load_model(cls, folder: Path, what: str):
    """Strict: every weight of the config present, no stray ones, no shape mismatch; only .safetensors are read."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file}: missing; expected a diffusers {cls.__name__} folder for the {what}")
    try:
        json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{folder}: no .safetensors weights for the {what} (other formats are not loaded)")
    where = weights[0] if len(weights) == 1 else folder
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False,
                                          output_loading_info=True)
    except Exception as err:  # diffusers raises several types on unreadable configs and mismatching weights
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        details = [re.match(r"size mismatch for ([^:]+):.*?Size\((\[.*?\])\).*?Size\((\[.*?\])\)", ln)
                   for ln in lines[1:]]
        details = [d for d in details if d]
        if details:  # torch lists one line per tensor: name the first few
            name, found, expected = details[0].groups()
            raise CheckpointError(f"{where}: {what} weights do not match {config_file}: size mismatch for "
                                  f"{_listed([d.group(1) for d in details])} (first: {found} in the weights, "
                                  f"{expected} in the config)") from None
        raise CheckpointError(f"{where}: cannot load the {what} ({lines[0] if lines else type(err).__name__})") from None
    problems = [f"{kind} keys {_listed(sorted(info.get(key) or []))}"
                for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"))
                if info.get(key)]
    if info.get("mismatched_keys"):
        problems.append(f"mismatched shapes {_listed([str(m[0]) for m in info['mismatched_keys']])}")
    if problems:
        raise CheckpointError(f"{where}: {what} weights do not match {config_file}: {'; '.join(problems)}")
    return model


def _load_student(path: Path, config: D3Config):
    """The student of a checkpoint: its own weights, or the base model's with the saved LoRA adapter."""
    from .denoisers import denoiser_class

    cls = denoiser_class(config.architecture)
    what = "UNet" if config.architecture == "unet" else f"{config.architecture} transformer"
    if not config.lora_adapter:
        return _load_model(cls.model_class(), path / cls.subfolder, what)
    from .lora import load_adapter

    adapter = path / config.lora_adapter
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: missing (the LoRA adapter named in {path / 'd3_config.json'})")
    base = Path(config.base_model).expanduser()
    if not base.is_dir():
        try:
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(config.base_model, allow_patterns=[f"{cls.subfolder}/*"]))
        except Exception as err:
            raise CheckpointError(f"{path / 'd3_config.json'}: this LoRA checkpoint needs its base model "
                                  f"{config.base_model!r} (a local folder or a hub id; {type(err).__name__}); "
                                  "edit base_model to point at a local copy") from None
    try:
        model = _load_model(cls.model_class(), base / cls.subfolder, what)
        return load_adapter(model, adapter)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{adapter}: cannot load the LoRA adapter onto {base / cls.subfolder} ({err})") from None


class D3Predictor:
    """One UNet evaluation per image: clean latent in, task latent out, decoded by the VAE."""

    def __init__(self, unet, vae, prompt_embeds: torch.Tensor, config: D3Config, device=None, dtype=None):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(self.device))
        from .denoisers import as_denoiser

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
        the VAE, specialised per input shape; sizes are multiples of `size_multiple`, so each resolution bucket
        (and batch size) compiles once, the first batch of a bucket being slow, and no new image size recompiles.
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            from torch._dynamo import config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            for module in (self.unet, self.vae.encoder, self.vae.decoder):
                module.compile(backend=compile_backend, dynamic=False)
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
            return cls(_load_student(path, config), _load_model(AutoencoderKL, path / "vae", "VAE"),
                       read_condition(embeds_file, config.architecture), config, device, dtype)
        if not embeds_file.exists():
            raise CheckpointError(f"{embeds_file}: missing (the fixed prompt conditioning)")
        try:
            prompt_embeds = load_file(str(embeds_file))["prompt_embeds"]
        except Exception as err:
            raise CheckpointError(f"{embeds_file}: unreadable or without 'prompt_embeds' ({err})") from None
        unet = _load_student(path, config) if config.lora_adapter else _load_model(UNet2DConditionModel,
                                                                                     path / "unet", "UNet")
        vae = _load_model(AutoencoderKL, path / "vae", "VAE")
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
        """Decoded (3,H,W) in [-1,1] -> the task's map (README, "Inference": the table of files per task), on the
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


# The authors' fixed square network input (docs/protocols.md, "Inference settings").
OFFICIAL_PROCESSING_RES = 768


def resolve_checkpoint(name: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint folder or file as it is; an `owner/name` hub id downloaded (and cached) to a folder."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, revision=revision))
        except Exception as err:  # offline, unknown id, gated, ...
            raise CheckpointError(f"{text}: not a local folder or file, and not downloadable from the Hugging Face "
                                  f"Hub ({type(err).__name__}); pass a local checkpoint folder") from None
    raise CheckpointError(f"{path}: no such checkpoint folder or file")
