"""Where and in which precision models run: the device and dtype defaults and a cast that stays quiet.

Shared by inference, evaluation, training and the tools, below all of them.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The named device, or for None / "auto" the best one present: cuda, then mps, then the CPU."""
    if isinstance(device, torch.device):
        return device
    if device not in (None, "auto"):
        return torch.device(device)
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
    """Move a model, casting only when the dtype really changes.

    diffusers' `ModelMixin.to(dtype)` warns about "modules that should be kept in float32" on every cast, even when
    the model lists none (diffusers 0.42 tests the list against None, never empty): such a model is cast by torch's
    own `Module.to`, which is what diffusers then does anyway, so users do not see a false warning on every run.
    """
    module = module.to(device)
    if next(module.parameters()).dtype == dtype:
        return module
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(dtype)  # diffusers keeps those modules in fp32
    return torch.nn.Module.to(module, dtype)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
