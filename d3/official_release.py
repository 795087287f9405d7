"""Reading the authors' released training module (`depth_checkpoint.pth`, ...): its keys sorted out, strictly.

The release is the state dict of the whole training module::

    d3_predictor.<diffusers UNet2DConditionModel key>   the student: the only weights inference needs
    timestep                                            its learned scalar timestep (bf16: 261 is stored as 260)
    visual_experts.*  adapters.*  mapping.*  time_emb.*  time_in_proj.*  ae.*
                                                        teacher, projection heads, their time mapping, frozen VAE

The authors load it with `strict=False`, which silently skips anything misnamed. Here every key must be accounted
for. Only tensors are read: `torch.load(weights_only=True)` (nothing arbitrary is unpickled) or safetensors.
`d3.convert` turns a release into a predictor; training continues one (`--init_from`) through
`load_official_training_state`. Neither needs the other, so this module imports no model code (and no torch at
module level: `python -m d3.convert --help` stays quick).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .flags import TASKS, CheckpointError

if TYPE_CHECKING:
    import torch


STUDENT_PREFIX = "d3_predictor."
TIMESTEP_KEYS = ("timestep", STUDENT_PREFIX + "timestep")
# Training-only parts of the official module; dropped at inference, as the authors' own scripts do.
IGNORED_PREFIXES = {
    "visual_experts.": "frozen teacher UNet",
    "adapters.": "projection heads",
    "mapping.": "time-conditioning network of the heads",
    "time_emb.": "Fourier features of the heads' time input",
    "time_in_proj.": "input projection of the heads' time mapping",
    "ae.": "frozen VAE (taken from the base model instead)",
}
# Containers that DeepSpeed (`module`), Lightning (`state_dict`) and others wrap a state dict in.
WRAPPER_KEYS = ("module", "state_dict", "model", "model_state_dict")
_LISTED = 20  # key names printed per category in an error


class OfficialCheckpointError(CheckpointError):
    """The official file is unreadable, or its keys do not match the student UNet; the message names both."""


@dataclass
class OfficialWeights:
    """The official state dict sorted out: student UNet weights, timestep, ignored keys (prefix -> count)."""

    unet: dict[str, torch.Tensor]
    timestep: float | None
    ignored: dict[str, int] = field(default_factory=dict)


def infer_task(path: str | Path, task: str | None = None) -> str:
    """`task` if given, else the one task named in the file name (or, failing that, its folder's name)."""
    if task is not None:
        if task not in TASKS:
            raise OfficialCheckpointError(f"{path}: task {task!r} is not one of {TASKS}")
        return task
    path = Path(path)
    aliases = {"depth": "depth", "normal": "normal", "matting": "matting", "matte": "matting", "alpha": "matting"}
    for name in (path.stem, path.parent.name):
        found = {aliases[m] for m in re.findall("|".join(aliases), name.lower())}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise OfficialCheckpointError(f"{path}: the name mentions several tasks {sorted(found)}; pass --task")
    raise OfficialCheckpointError(f"{path}: cannot tell the task from the file name; pass --task {'|'.join(TASKS)}")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(3):  # e.g. {"module": {...}} or {"state_dict": {...}}
        if not isinstance(obj, Mapping):
            break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise OfficialCheckpointError(f"{path}: expected a state dict (name -> tensor), possibly under one of "
                                      f"{WRAPPER_KEYS}; found {type(obj).__name__}")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise OfficialCheckpointError(f"{path}: entries that are not tensors: {_names(bad)}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel / DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in the file, unwrapped from a DeepSpeed / Lightning container; nothing but tensors is loaded."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file (expected the authors' .pth checkpoint)")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path)), path)
        except OfficialCheckpointError:
            raise
        except Exception as err:
            raise OfficialCheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for truncated files, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OfficialCheckpointError(f"{path}: cannot be read as tensors only (torch.load weights_only=True: "
                                      f"{first}); expected the authors' state dict") from None
    return _unwrap(obj, path)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")


def split_official_state_dict(state: Mapping[str, torch.Tensor], unet_reference: Mapping[str, torch.Tensor],
                              source: str | Path = "checkpoint") -> OfficialWeights:
    """Sort every key: student weight, timestep, or a known training-only part; anything else is an error.

    `unet_reference` is the state dict of the UNet the student is loaded into (names and shapes to match).
    """
    unet: dict[str, torch.Tensor] = {}
    timesteps: dict[str, torch.Tensor] = {}
    ignored: dict[str, int] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in TIMESTEP_KEYS:
            timesteps[key] = value
        elif key.startswith(STUDENT_PREFIX) and key[len(STUDENT_PREFIX):] in unet_reference:
            unet[key[len(STUDENT_PREFIX):]] = value
        elif (prefix := next((p for p in IGNORED_PREFIXES if key.startswith(p)), None)) is not None:
            ignored[prefix] = ignored.get(prefix, 0) + 1
        else:
            unexpected.append(key)
    missing = sorted(STUDENT_PREFIX + k for k in unet_reference if k not in unet)
    wrong_shape = sorted(f"{STUDENT_PREFIX}{k} {tuple(v.shape)} (expected {tuple(unet_reference[k].shape)})"
                         for k, v in unet.items() if v.shape != unet_reference[k].shape)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (neither '{STUDENT_PREFIX}<UNet key>', 'timestep', nor "
                        f"one of {sorted(IGNORED_PREFIXES)}): {_names(sorted(unexpected))}")
    if missing:
        problems.append(f"{len(missing)} student UNet weights missing: {_names(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} student weights of the wrong shape: {_names(wrong_shape)}")
    values = {k: float(v.float().reshape(-1)[0]) for k, v in timesteps.items() if v.numel() == 1}
    if len(values) != len(timesteps):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in timesteps.items())
        problems.append(f"the timestep is not a scalar: {shapes}")
    elif len(set(values.values())) > 1:
        problems.append(f"two different timesteps {values}")
    if problems:
        raise OfficialCheckpointError(f"{source}: does not match the D3 layout against this base UNet:\n  - "
                                      + "\n  - ".join(problems))
    return OfficialWeights(unet, next(iter(values.values()), None), ignored)


HEAD_PREFIXES = ("adapters.", "mapping.", "time_emb.", "time_in_proj.")


def load_official_training_state(path: str | Path, model) -> dict[str, int]:
    """Continue the authors' training: load their release into a `d3.objective.D3Model` built on the same base.

    The student, its learned timestep and the projection heads (time mapping included) are loaded strictly; the
    frozen teacher (`visual_experts.*`) and VAE (`ae.*`) are counted and skipped (the base model provides both).
    Any other key, a missing one or a wrong shape stops the load with the names listed. Returns the key counts.
    """
    import torch

    path = Path(path)
    state = read_official_state_dict(path)
    weights = split_official_state_dict(state, model.student.state_dict(), path)
    if weights.timestep is None:
        raise OfficialCheckpointError(f"{path}: no learned timestep (looked for {' / '.join(TIMESTEP_KEYS)})")
    head_state = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    expected = model.heads.state_dict()
    missing = sorted(set(expected) - set(head_state))
    unexpected = sorted(set(head_state) - set(expected))
    wrong = sorted(f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in head_state.items()
                   if k in expected and v.shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} projection-head keys missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} projection-head keys this run has no head for: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} projection-head tensors of the wrong shape: {_names(wrong)}")
    if problems:
        raise OfficialCheckpointError(
            f"{path}: the heads do not match this run's (the authors' heads need --head_type cleandift and the 'up' "
            "layer set of a Stable Diffusion 2.1 UNet):\n  - " + "\n  - ".join(problems))
    model.student.load_state_dict(weights.unet, strict=True)
    model.heads.load_state_dict(head_state, strict=True)
    with torch.no_grad():
        model.student_timestep.fill_(weights.timestep)
    skipped = {k: n for k, n in weights.ignored.items() if k not in HEAD_PREFIXES}
    return {"student": len(weights.unet), "timestep": 1, "heads": len(head_state), **skipped}
