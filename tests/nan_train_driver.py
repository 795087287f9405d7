"""train_depth.py whose task loss is NaN at chosen micro-steps of this process (for tests that launch it, e.g. with
`accelerate launch`, where the recipe cannot be replaced in the test's own process).

    python tests/nan_train_driver.py --nan_at_micro_step N [--nan_at_micro_step M ...] -- TRAIN FLAGS

Micro-steps count from 1 in this process (a resumed run counts from its first micro-step after the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import train_depth
    from d3.train_cli import main as train_main

    p = argparse.ArgumentParser()
    p.add_argument("--nan_at_micro_step", type=int, action="append", default=[])
    ours, train_argv = p.parse_known_args()
    if train_argv and train_argv[0] == "--":
        train_argv = train_argv[1:]
    calls = {"n": 0}

    def task_loss(pred, batch):
        calls["n"] += 1
        terms = train_depth.RECIPE.task_loss(pred, batch)
        if calls["n"] in ours.nan_at_micro_step:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    train_main(replace(train_depth.RECIPE, task_loss=task_loss), train_argv)


if __name__ == "__main__":
    main()
