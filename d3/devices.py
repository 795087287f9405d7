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


def use_device(device: str | torch.device | None) -> None:
    """Make a CUDA device with an index (cuda:K) the process's current one, once, before anything touches CUDA.

    Otherwise every process also creates a context on cuda:0 (pinned host memory and streams belong to the current
    device), and work that names no device (an event's record(), a stream) goes to cuda:0, not to the model's GPU.
    """
    if device in (None, "auto"):
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision where the hardware does it well; fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def cast_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model and cast it in one step, casting only when the dtype really changes.

    One `.to(device=, dtype=)`: each tensor is converted on its way (for a CPU-to-GPU copy torch converts on the
    host), so the model never exists on the device in fp32. Moving first and casting after would need the fp32
    model's memory on the GPU for a moment: 48 GB for FLUX's transformer, whose bf16 copy needs 24.

    diffusers' `ModelMixin.to(dtype)` only adds a warning about "modules that should be kept in float32" on every
    cast (diffusers 0.42 tests the list against None, never empty) and then calls torch's `Module.to`, so that is
    called directly for a model that lists none; one that lists some gets diffusers' warning.
    """
    if next(module.parameters()).dtype == dtype:
        return module.to(device)
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return torch.nn.Module.to(module, device=device, dtype=dtype)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
