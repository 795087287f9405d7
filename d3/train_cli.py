"""The command line of train_depth.py, train_normal.py and train_matting.py: parse, check, then train.

Above both `d3.training_args` (the flags, light) and `d3.training` (the loop, heavy), so `--help` and a bad flag
answer before torch, diffusers or accelerate are imported; and above `d3.validation`, which it hands to the loop when
--validation_dataset is given (the loop itself never imports the predictor or evaluation code).
"""

from __future__ import annotations

from .flags import parse_checked
from .training_args import TaskRecipe, build_parser, validate_args


def main(recipe: TaskRecipe, argv: list[str] | None = None, description: str | None = None) -> None:
    """Parse and check the flags, then train (the model code is imported only now)."""
    args = parse_checked(build_parser(recipe, description), lambda args: validate_args(args, recipe), argv)
    from .training import train  # noqa: PLC0415  (torch, diffusers, accelerate: only for a run that will start)
    from .validation import Validation  # noqa: PLC0415  (the predictor and evaluation code: the same)

    train(args, recipe, Validation)
