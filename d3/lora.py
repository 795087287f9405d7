"""LoRA on the student (through peft) and writing a trained student's weights.

FLUX.1-dev has 11.9B parameters: full fine-tuning with AdamW needs ~16 bytes per parameter (190 GB) and so several
GPUs (FSDP, `configs/fsdp_flux.yaml`). On one 80 GB GPU the student instead keeps its pretrained weights frozen in
bf16 and trains low-rank adapters; the teacher then needs no copy of its own (`Denoiser.without_adapters`).

A LoRA student is exported either *merged* (W + scale·B·A written as the ordinary diffusers model: loads and runs
like any checkpoint) or as an *adapter* (only the low-rank weights, a few hundred MB; loading needs the base model).
Both give the same predictions as the model that was trained (tests/test_dit.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ADAPTER_NAME = "default"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' file names, so from_pretrained reads them


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SystemExit("error: --lora_rank needs peft (pip install peft)") from None


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...] | list[str], alpha: float | None = None,
             dropout: float = 0.0) -> None:
    """Inject LoRA layers (B initialised to zero: the student starts exactly as the pretrained model) in place.

    Only the adapters train; they are kept in fp32 whatever the frozen base weights' precision.
    """
    require_peft()
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights=True,
                        target_modules=list(targets))
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    cast_training_params(model, dtype=torch.float32)


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the model with every LoRA layer folded in (W + scale·B·A), under the plain model's names.

    Computed on the side: the model itself is not merged (merging and unmerging in place would round the base
    weights of a model that goes on training). Each merged tensor goes to the CPU at once, so exporting a 12B
    student costs one layer of extra GPU memory, not a second copy of the model.

    Floating-point tensors come out in fp32 (or `dtype`): W + scale·B·A is what the trained model computed with its
    bf16 base and fp32 adapters, and rounding the sum back to bf16 would change its predictions; the other tensors
    are widened exactly, so the export is one fp32 model like a full fine-tuning's.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in getattr(module, "lora_A", {}):
            deltas[name] = module
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        owner = plain.rsplit(".", 1)[0]
        if owner in deltas and plain.endswith(".weight"):
            layer = deltas[owner]
            value = value.float() + layer.get_delta_weight(ADAPTER_NAME).float()  # summed and kept in fp32
        wide = dtype or (torch.float32 if value.is_floating_point() else value.dtype)
        state[plain] = value.detach().to("cpu", wide)
    return state


def save_weights(model: nn.Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                 max_shard_size: str = "10GB") -> Path:
    """Write `model`'s config and the given weights as a diffusers model folder (sharded safetensors + index).

    `state_dict` defaults to the model's own (merged when it carries LoRA); pass the full state dict gathered from
    FSDP shards to write a sharded model.
    """
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = merged_state_dict(model) if has_lora(model) else model.state_dict()
    for stale in folder.glob("diffusion_pytorch_model*.safetensors*"):
        stale.unlink()
    model.save_config(folder)
    save_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder,
                          filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    return folder


ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' adapter file name and metadata key
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Only the LoRA weights (safetensors, with their LoraConfig as metadata), in diffusers' adapter format
    (what `save_lora_adapter` writes; done here so the frozen base weights are not touched or re-cast)."""

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config[ADAPTER_NAME].to_dict().items()}
    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / ADAPTER_FILE),
              metadata={"format": "pt", ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load an adapter written by `save_adapter` into the base model, in place."""
    require_peft()
    file = Path(folder) / ADAPTER_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing; expected the LoRA adapter of this checkpoint")
    model.load_lora_adapter(str(folder), prefix=None, adapter_name=ADAPTER_NAME, weight_name=ADAPTER_FILE,
                            use_safetensors=True)
    return model
