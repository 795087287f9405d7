"""Small helpers several test files share."""

from __future__ import annotations

from pathlib import Path

import torch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient the last backward pass left, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (b == 0 counts as a tiny norm, so any difference shows)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class PickleTrap:
    """Unpickling this object creates a marker file: proof that something executed code from a data file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
