"""The training flags: `TaskRecipe`, `build_parser(recipe)` and `validate_args`, without the model code.

The parser and its checks import nothing heavy (no torch, diffusers or accelerate), so `train_*.py --help` and a bad
flag answer at once; `d3.train_cli.main` imports the training loop (`d3.training`) only once every flag has
been checked.
`d3.training` re-exports these names (`from d3.training import build_parser` keeps working).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import flags
from .data.benchmarks import BENCHMARKS
from .flags import DEFAULT_BASE_MODEL, HEAD_TYPES, LAYER_SETS, MIXING_MODES, FlagError, parse_dataset_spec

if TYPE_CHECKING:
    import torch


@dataclass
class TaskRecipe:
    task: str  # "depth" | "normal" | "matting"
    prompt: str
    modality: str  # which ground truth the datasets load: "depth" | "normal" | "alpha"
    default_mixing: dict[str, float]  # source kind -> sampling probability (renormalised over what is given)
    loss_weights: dict[str, float]  # term name -> default weight inside L_task
    task_loss: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]  # decoded prediction, batch -> terms
    # the reader's raw ground truth -> 3-channel target in [-1, 1] (what each modality passes: d3.data.folders.
    # TrainingFolder); every folder of raw ground truth needs it, only the authors' pre-encoded depth targets do not
    encode_target: Callable[[dict], torch.Tensor] | None = None
    flip_target: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)  # after a horizontal flip
    default_datasets: list[str] = field(default_factory=list)
    # the paper's sources, as folders under --data_dir (d3.flags.TRAINING_SOURCES): trained when --dataset is not given
    data_sources: tuple[str, ...] = ()
    paper_mixing: dict[str, float] | None = None  # the paper's stated shares where they differ (used by --mixing paper)


# ------------------------------------------------------------------------------------------------------------ flags
def build_parser(recipe: TaskRecipe, description: str | None = None) -> argparse.ArgumentParser:
    p = flags.ArgumentParser(description=description or f"Train a D³ {recipe.task} predictor.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", default=DEFAULT_BASE_MODEL, help="hub id or local diffusers SD folder")
    a("--revision", default=None, help="hub revision (branch, tag or commit) of the base model")
    a("--variant", default=None, help="weights variant of the base model, e.g. fp16")
    a("--output_dir", default=f"d3-{recipe.task}", help="checkpoints and the final inference folder")
    a("--dataset", action="append", default=None, metavar="PATH[:PROB]",
      help="training folder (plain or the authors' format), repeatable; PROB overrides its mixing probability "
           f"(defaults by source kind: {recipe.default_mixing}"
           + (f"; with --mixing paper {recipe.paper_mixing}" if recipe.paper_mixing else "") + ")")
    # the data root (d3.flags, "the data root and its folders"): without --dataset, the paper's sources in it
    a("--data_dir", default=flags.default_data_dir(),
      help=f"the data root: without --dataset, train on the recipe's sources in it ("
           + ", ".join(f"{name}/" for name in recipe.data_sources)
           + f"; written by python -m d3.prepare) (default: ${flags.DATA_DIR_ENV}, else data)")
    a("--mixing", default="official", choices=MIXING_MODES,
      help="official (trained the released checkpoints): every full batch of every source once per epoch, so the "
           "sources' sizes set their shares and the probabilities only order the batches; paper: each batch's source "
           "drawn with the probabilities, with replacement, so the shares are the probabilities")
    a("--max_train_samples", type=int, default=None, help="use at most this many samples of each source (Fig. 8)")
    a("--resolution", type=int, default=768,
      help="square training resolution, a multiple of 8 (images are squashed, as official)")
    a("--hflip_prob", type=float, default=0.0,
      help="probability of a random horizontal flip per image (default 0: the authors train without augmentation; "
           "0.5 is Marigold's choice)")
    a("--loss_resolution", default="native", choices=["native", "train"],
      help="where depth and normal losses are taken: at each ground truth's native size, as the authors' code does "
           "(native), or on ground truth resized to the training square (train)")
    a("--init_from", default=None, metavar="PTH",
      help="start from the authors' released .pth (student, learned timestep and projection heads, strictly "
           "loaded) to continue their training; the base model still comes from --pretrained_model_name_or_path")
    a("--prompt", default=recipe.prompt, help="the fixed task prompt (appendix 6.2)")
    a("--train_batch_size", type=int, default=2, help="images per device per micro-batch")
    a("--gradient_accumulation_steps", type=int, default=16, help="micro-batches per optimizer update")
    a("--max_train_steps", type=int, default=30000, help="optimizer updates (0: export the untrained model)")
    a("--learning_rate", type=float, default=3e-5, help="AdamW learning rate after the warm-up")
    a("--lr_scheduler", default="constant_with_warmup",
      choices=["constant", "constant_with_warmup", "linear", "cosine", "polynomial"])
    a("--lr_warmup_steps", type=int, default=2000, help="optimizer updates of linear warm-up")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.01)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
      help="default: accelerate's config; frozen teacher and VAE are stored in this precision")
    a("--seed", type=int, default=42, help="all of the run's randomness derives from it")
    a("--dataloader_num_workers", type=int, default=2, help="processes reading training samples (0: in this one)")
    a("--checkpointing_steps", type=int, default=1000, help="save a resumable checkpoint-N every this many updates")
    a("--checkpoints_total_limit", type=int, default=3,
      help="keep only the newest N checkpoints (0: all); each holds the model, AdamW states and RNGs (SD 2.1: ~12 GB)")
    a("--export_every", type=int, default=3, metavar="K",
      help="also write the inference folder into every K-th checkpoint (0: none); the run's final model is exported "
           "once, into --output_dir. With K <= --checkpoints_total_limit a kept checkpoint always holds one")
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--logging_dir", default="logs", help="tracker logs, inside --output_dir")
    a("--log_history", default=None, metavar="JSON",
      help="also write every optimizer step's logged values (losses, lr, timestep, mixture) to this JSON file")
    # D³ objective
    a("--layer_set", default=None,
      help=f"aligned layers: UNet {LAYER_SETS} (default up), Flux single|single:N|double|all (default single: the "
           "last 25 single-stream blocks), SD3 blocks|blocks:N|all, or comma-separated module paths")
    a("--head_type", default="cleandift", choices=HEAD_TYPES, help="projection head (Table 7 ablation)")
    a("--num_timesteps", type=int, default=3, help="expert timesteps per image (stratified over [1, 999])")
    a("--student_timestep", type=float, default=None,
      help="initial student timestep on the 0-1000 scale (default: 261 for a UNet, 420 = 1000·σ for a DiT)")
    a("--freeze_timestep", action="store_true", help="keep the student timestep fixed instead of learning it")
    a("--lambda_task", type=float, default=1.0, help="λ in L = L_agg + λ·L_task")
    a("--lambda_align", type=float, default=1.0, help="weight of L_agg (0 disables the alignment)")
    for term, weight in recipe.loss_weights.items():
        a(f"--lambda_{term}", type=float, default=weight, help=f"weight of the {term} term in L_task")
    a("--on_bad_sample", default="skip", choices=["skip", "error"],
      help="an unreadable sample is skipped and counted, or stops the run")
    a("--max_nonfinite", type=int, default=10, help="stop after this many non-finite losses in a row")
    # several processes (DDP, FSDP, DeepSpeed)
    a("--ddp_timeout", type=int, default=7200, metavar="SECONDS",
      help="how long a process waits in a collective (all-reduce, barrier) before the job fails; it must cover the "
           "longest time one process works alone while the others wait: rank 0 gathering and writing an export "
           "(FLUX.1-dev: ~48 GB), a first compilation. A real hang still ends the job after this long")
    # speed and memory (docs/performance.md); none of these changes the step's mathematics
    a("--gradient_checkpointing", action="store_true",
      help="recompute the student's, the projection heads' and the VAE decoder's activations in the backward "
      "pass (less memory)")
    a("--channels_last", action="store_true", help="NHWC memory format for the UNets and the VAE")
    a("--compile", action="store_true", help="torch.compile student, teacher and VAE (one graph per resolution)")
    a("--allow_tf32", action="store_true", help="TF32 for the fp32 matmuls and convolutions (Ampere and newer)")
    a("--no_fused_adam", action="store_true", help="the foreach AdamW instead of the fused one (CUDA and CPU)")
    # memory for large backbones (FLUX.1-dev: docs/training.md, "DiT backbones"; docs/memory.md)
    a("--lora_rank", type=int, default=0,
      help="train LoRA adapters of this rank on the frozen student (0: full fine-tuning); the teacher then shares "
           "the student's frozen weights instead of holding a copy")
    a("--lora_alpha", type=float, default=None, help="LoRA scale numerator (default: the rank, i.e. scale 1)")
    a("--save_lora_as", default="merged", choices=["merged", "adapter"],
      help="export a LoRA student merged into full weights, or as the adapter alone (loads over the base model)")
    a("--use_8bit_adam", action="store_true", help="8-bit AdamW states (bitsandbytes, CUDA only)")
    add_validation_flags(p)
    return p


# ------------------------------------------------------------------------------- in-training validation (d3.validation)
DEFAULT_VALIDATION_STEPS = 500  # Marigold's trainer validates every 500 iterations


def add_validation_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--validation_dataset", action="append", default=None, metavar="NAME=PATH[:N]",
      help="score the student during training on an evaluate.py benchmark (repeatable): NAME one of "
           f"{sorted(BENCHMARKS)}, PATH its --data-root, N its first N samples (default: all); the same protocol "
           "and numbers as evaluate.py --checkpoint")
    a("--validation_steps", type=int, default=None, metavar="K",
      help=f"validate every K optimizer updates and after the last (default {DEFAULT_VALIDATION_STEPS} once a "
           "--validation_dataset is given)")
    a("--validation_images", type=int, default=4, metavar="M",
      help="samples pictured per set and validation (input | prediction | ground truth | error; 0: none)")
    a("--best_metric", default=None, metavar="SET/METRIC",
      help="keep OUTPUT/best/ at the best value of this metric (default: the first set's main metric: abs_rel for "
           "depth, mean angular error for normals, sad for mattes, iou for masks)")
    a("--validate_at_start", action="store_true", help="also validate the untrained model (step 0)")


def parse_validation_spec(spec: str) -> tuple[str, str, int | None]:
    """`NAME=PATH[:N]` -> (name, path, N or None). Raises FlagError."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise flags.bad("--validation_dataset", spec, "expected NAME=PATH[:N]")
    path, colon, count = rest.rpartition(":")
    if not colon or not count.isdigit():
        return name, rest, None
    if int(count) < 1:
        raise flags.bad("--validation_dataset", spec, "N (samples) must be at least 1")
    return name, path, int(count)


def check_validation_flags(args: argparse.Namespace) -> None:
    """The validation flags without opening a set: names, paths, counts, periods, the best metric's set."""
    specs = getattr(args, "validation_dataset", None) or []
    names = []
    for spec in specs:
        name, path, _ = parse_validation_spec(spec)
        if name not in BENCHMARKS:
            raise flags.bad("--validation_dataset", spec,
                            f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
        if not Path(path).expanduser().exists():
            raise flags.bad("--validation_dataset", spec, f"{path}: no such file or folder")
        if name in names:
            raise flags.bad("--validation_dataset", spec, f"{name} is given twice")
        names.append(name)
    if not specs:
        for flag in ("--validation_steps", "--best_metric"):
            if getattr(args, flag[2:], None) is not None:
                raise flags.bad(flag, getattr(args, flag[2:]), "needs a --validation_dataset")
        if getattr(args, "validate_at_start", False):
            raise FlagError("--validate_at_start needs a --validation_dataset")
        return
    flags.at_least("--validation_steps", args.validation_steps, 1)
    flags.at_least("--validation_images", args.validation_images, 0)
    if args.best_metric is not None:
        name, slash, metric = args.best_metric.partition("/")
        if not slash or name not in names or not metric:
            raise flags.bad("--best_metric", args.best_metric, f"expected SET/METRIC with SET one of {names}")


def validate_args(args: argparse.Namespace, recipe: TaskRecipe) -> None:
    """Every check that needs no model: numbers in range, folders and files that exist, well-formed --dataset specs.
    Raises FlagError naming the flag and its value; `main` turns it into a one-line usage error (status 2)."""
    if args.dataset is None and recipe.data_sources:
        args.dataset = data_root_sources(args.data_dir, recipe)
    specs = args.dataset or recipe.default_datasets
    if not specs:
        raise FlagError("--dataset: no training data; pass --dataset PATH[:PROB] (see docs/data.md)")
    given = []
    for spec in specs:
        path, prob = parse_dataset_spec(spec)
        if not Path(path).expanduser().is_dir():
            raise flags.bad("--dataset", spec, "no such folder (expected PATH or PATH:PROB with PROB a number)")
        if prob is not None and not prob >= 0:
            raise flags.bad("--dataset", spec, "the mixing probability PROB must be non-negative")
        given.append(prob)
    if given and all(p == 0 for p in given):
        raise FlagError("--dataset: every mixing probability is 0; at least one source must be drawn")
    flags.model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                       "folder (expected a diffusers Stable Diffusion folder)")
    flags.at_least("--resolution", args.resolution, 8)
    flags.multiple_of("--resolution", args.resolution, 8)
    for flag in ("--train_batch_size", "--gradient_accumulation_steps", "--checkpointing_steps",
                 "--max_train_samples", "--num_timesteps", "--max_nonfinite", "--ddp_timeout"):
        flags.at_least(flag, getattr(args, flag[2:]), 1)
    # --max_train_steps 0 exports the untrained model (the quick start's baseline)
    for flag in ("--max_train_steps", "--checkpoints_total_limit", "--export_every", "--lr_warmup_steps",
                 "--dataloader_num_workers", "--lora_rank", "--adam_weight_decay", "--lambda_task", "--lambda_align",
                 *(f"--lambda_{term}" for term in recipe.loss_weights)):
        flags.at_least(flag, getattr(args, flag[2:]), 0)
    for flag in ("--learning_rate", "--adam_epsilon", "--max_grad_norm", "--lora_alpha"):
        flags.positive(flag, getattr(args, flag[2:]))
    flags.between("--hflip_prob", args.hflip_prob, 0, 1)
    for flag in ("--adam_beta1", "--adam_beta2"):
        value = getattr(args, flag[2:])
        if not 0 <= value < 1:
            raise flags.bad(flag, value, "must lie in [0, 1)")
    flags.between("--student_timestep", args.student_timestep, 0, 1000)
    flags.existing_path("--init_from", args.init_from, "no such file")
    resume = args.resume_from_checkpoint
    if resume and resume != "latest" and not (Path(resume) / "training_state").is_dir():
        raise flags.bad("--resume_from_checkpoint", resume, "not a d3 training checkpoint (no training_state/ "
                        "inside); pass a checkpoint-N folder or 'latest'")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise flags.bad("--output_dir", args.output_dir, "is a file, not a folder")
    if args.log_history:  # written at the end of the run: its folder must exist by then (--output_dir is created)
        folder = Path(args.log_history).expanduser().parent
        if not (folder.is_dir() or folder.resolve() == output_dir.resolve()):
            raise flags.bad("--log_history", args.log_history, "its folder does not exist")
    check_validation_flags(args)


def data_root_sources(data_dir: str, recipe: TaskRecipe) -> list[str]:
    """The recipe's sources under the data root, as --dataset values; a MissingError names every one that is not
    there (its path and the command that writes it)."""
    missing, found = [], []
    for name in recipe.data_sources:
        path = Path(data_dir) / name
        if path.expanduser().is_dir():
            found.append(str(path.expanduser()))
            continue
        what, command = flags.TRAINING_SOURCES[name]
        missing.append(f"{path} ({what}, a source of the paper's {recipe.task} recipe): make it with "
                       f"`{command.format(path=path)}`, or pass --dataset PATH to train on other folders")
    if missing:
        raise flags.MissingError(missing)
    return found
