"""Runs train_depth's recipe in a real process that SIGKILLs itself at a chosen moment (for the reliability tests).

    python tests/reliability_train_driver.py [--kill_at_micro_step N | --kill_in_checkpoint STEP |
                                              --kill_in_validation STEP] -- TRAIN FLAGS

--kill_at_micro_step N   SIGKILL in the middle of micro-step N (after its forward pass, before its backward).
--kill_in_checkpoint S   SIGKILL while checkpoint S is being written: its training state and the UNet of its
                         inference folder are on disk in `.checkpoint-S.tmp`, the VAE, prompt and config are not.
--kill_in_validation S   SIGKILL in the validation at step S (--validation_dataset), at its second prediction.

Nothing here changes how training computes; the hooks only decide when the process dies. A real SIGKILL: no
Python cleanup, no `finally`, no flushing, exactly as an out-of-memory killer or a pre-empted node would do it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("D3_TEST_THREADS", "1")))
    import train_depth
    from d3 import training

    p = argparse.ArgumentParser()
    p.add_argument("--kill_at_micro_step", type=int, default=None)
    p.add_argument("--kill_in_checkpoint", type=int, default=None)
    p.add_argument("--kill_in_validation", type=int, default=None)
    ours, train_argv = p.parse_known_args()
    if train_argv and train_argv[0] == "--":
        train_argv = train_argv[1:]

    recipe = train_depth.RECIPE
    if ours.kill_at_micro_step is not None:
        calls = {"n": 0}

        def task_loss(pred, batch):
            calls["n"] += 1  # one call per micro-step of this process; the resumed count starts at the checkpoint
            if calls["n"] == ours.kill_at_micro_step:
                die()
            return train_depth.RECIPE.task_loss(pred, batch)

        recipe = replace(recipe, task_loss=task_loss)

    if ours.kill_in_checkpoint is not None:
        real_export = training.export_predictor

        def export_predictor(path, model, *rest, **kw):
            if Path(path).name == f".checkpoint-{ours.kill_in_checkpoint}.tmp":
                model.student.save_pretrained(Path(path) / "unet", safe_serialization=True)
                die()
            real_export(path, model, *rest, **kw)

        training.export_predictor = export_predictor

    from d3 import validation

    if ours.kill_in_validation is not None:
        real_run, real_predict = validation.Validation.run, validation.LivePredictor.predict
        calls = {"n": 0}

        def predict(self, *args, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
            return real_predict(self, *args, **kw)

        def run(self, step):
            if step == ours.kill_in_validation:
                validation.LivePredictor.predict = predict
            return real_run(self, step)

        validation.Validation.run = run

    args = training.build_parser(recipe).parse_args(train_argv)
    training.train(args, recipe, validation.Validation)


if __name__ == "__main__":
    main()
