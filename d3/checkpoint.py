"""The d3 checkpoint folder: its format, its strict loader, and the tasks and prompts it knows.

Checkpoint folder (docs/inference.md, "Checkpoint format")::

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .denoisers import ARCHITECTURES, as_denoiser, denoiser_class
from .devices import cast_module
from .flags import PROMPTS, RESIZE_MODES, TASKS, CheckpointError  # noqa: F401  (light: the flags choose from them)
from .lora import has_lora, load_adapter, save_adapter, save_weights

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
    pretrained = getattr(vae, EXPORT_STATE, None)
    if pretrained is not None:  # a VAE cast for training: write the weights it had before the cast
        save_weights(vae, path / "vae", pretrained)
    else:
        vae.save_pretrained(path / "vae", safe_serialization=True)
    save_file(_condition_tensors(prompt_embeds, denoiser.architecture), str(path / "prompt_embeds.safetensors"))
    config.write(path)
    return path


EXPORT_STATE = "_d3_export_state"  # a module attribute: the weights save_checkpoint writes instead of its own


def cast_keeping_export_weights(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`cast_module` for a frozen part that is exported as it was loaded (the training VAE under bf16/fp16): the
    weights before the cast stay on the CPU (no copy: the cast makes new tensors) and `save_checkpoint` writes them,
    so the checkpoint's VAE is the pretrained fp32 one, bit for bit, not its bf16 rounding."""
    before = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    casts = next(module.parameters()).dtype != dtype
    module = cast_module(module, device, dtype)
    if casts:
        setattr(module, EXPORT_STATE, before)
    return module


def _condition_tensors(prompt_embeds, architecture: str) -> dict[str, torch.Tensor]:
    """What prompt_embeds.safetensors holds: "prompt_embeds" for a UNet (the original format), else the dict."""
    if torch.is_tensor(prompt_embeds):
        prompt_embeds = {"encoder_hidden_states": prompt_embeds}
    if architecture == "unet":
        prompt_embeds = {"prompt_embeds": prompt_embeds["encoder_hidden_states"]}
    return {k: v.detach().float().cpu().contiguous() for k, v in prompt_embeds.items()}


def read_condition(file: Path, architecture: str = "unet") -> torch.Tensor | dict[str, torch.Tensor]:
    """prompt_embeds.safetensors -> a tensor (UNet) or the DiT's conditioning dict; errors name the file."""
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


def load_model(cls, folder: Path, what: str):
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


def load_student(path: Path, config: D3Config):
    """The student of a checkpoint: its own weights, or the base model's with the saved LoRA adapter."""
    cls = denoiser_class(config.architecture)
    what = "UNet" if config.architecture == "unet" else f"{config.architecture} transformer"
    if not config.lora_adapter:
        return load_model(cls.model_class(), path / cls.subfolder, what)
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
        model = load_model(cls.model_class(), base / cls.subfolder, what)
        return load_adapter(model, adapter)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{adapter}: cannot load the LoRA adapter onto {base / cls.subfolder} ({err})") from None


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
