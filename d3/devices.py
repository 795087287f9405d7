"""Where and in which precision models run: the device and dtype defaults and a cast that stays quiet.

Shared by inference, evaluation, training and the tools, below all of them.
"""

from __future__ import annotations

import copy

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


def cast_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """An independent copy of `module` whose floating-point parameters and buffers are `dtype` on `device`, made
    without a full-precision copy: each tensor is converted on its way into the copy (the original stays as it is).
    A `copy.deepcopy` followed by a cast would hold a second fp32 model in host memory for a moment: 48 GB for
    FLUX.1-dev's transformer, in every process of a multi-GPU run."""

    def converted(t: torch.Tensor) -> torch.Tensor:
        # copy=True: in the same dtype on the same device `.to` would return the tensor itself, shared with the original
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(converted(p), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = converted(b)
    return copy.deepcopy(module, memo)  # deepcopy takes the tensors above for the originals, so none is copied


def compile_settings(recompiles: int = 64, checkpointing: bool = False) -> None:
    """dynamo's settings for compiling d3's models, on every torch d3 supports (requirements: torch >= 2.4).

    `recompiles`: graphs kept per compiled function (one per input shape and batch size) before dynamo falls back
    to eager; the setting is `recompile_limit` from torch 2.7 on, `cache_size_limit` before.

    `checkpointing` (training with --gradient_checkpointing): the feature hooks store each hooked layer's output in
    a dict, a Python side effect inside a checkpointed block. dynamo cannot replay it in the backward's recomputation,
    so by default it breaks the graph at every such block and recompiles on the next step (the tiny UNet: 12 graphs
    after one step, 22 after two, instead of 4; FLUX hooks whole checkpointed blocks).
    `skip_fwd_side_effects_in_bwd_under_checkpoint` lets it trace them, applying the side effect in the
    forward only: what the step needs (the stored features are read after the forward; the recomputation's stores
    are stale copies that eager mode writes and nothing reads).
    """
    from torch._dynamo import config  # noqa: PLC0415  (slow to import; only when compiling)

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), recompiles))
    if checkpointing and hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
