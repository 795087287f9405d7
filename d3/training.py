"""The training machinery shared by train_depth.py, train_normal.py and train_matting.py.

A task is a `TaskRecipe` (prompt, data modality, mixing defaults, target encoding, loss terms and weights); this
module owns everything else: flags in the style of the diffusers training examples, the D³ step, gradient
accumulation, mixed precision, checkpoints that resume exactly, logging, and the export of the inference folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from .aggregation import D3Model, expert_features, layer_channels, stratified_timesteps
from .backbone import (
    DEFAULT_BASE_MODEL,
    decode_latent,
    encode_image,
    encode_prompt,
    load_backbone,
    vae_scale_factor,
)
from .data.folders import BadSampleError, open_sources
from .data.mixing import MixedBatchSampler, concat, mixing_probabilities, parse_dataset_spec
from .features import LAYER_SETS, FeatureCapture, unet_layer_set
from .heads import HEAD_TYPES, ProjectionHeads
from .predictor import cast_module

logger = logging.getLogger("d3.train")


@dataclass
class TaskRecipe:
    task: str  # "depth" | "normal" | "matting"
    prompt: str
    modality: str  # which ground truth the datasets load: "depth" | "normal" | "alpha"
    default_mixing: dict[str, float]  # source kind -> sampling probability (renormalised over what is given)
    loss_weights: dict[str, float]  # term name -> default weight inside L_task
    task_loss: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]  # decoded prediction, batch -> terms
    encode_target: Callable[[dict], torch.Tensor] | None = None  # raw sample -> 3-channel target in [-1, 1]
    flip_target: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)  # after a horizontal flip
    default_datasets: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------ flags
def build_parser(recipe: TaskRecipe, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or f"Train a D³ {recipe.task} predictor.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", default=DEFAULT_BASE_MODEL, help="hub id or local diffusers SD folder")
    a("--revision", default=None)
    a("--variant", default=None)
    a("--output_dir", default=f"d3-{recipe.task}", help="checkpoints and the final inference folder")
    a("--dataset", action="append", default=None, metavar="PATH[:PROB]",
      help="training folder (plain or the authors' format), repeatable; PROB overrides its mixing share "
           f"(defaults by source kind: {recipe.default_mixing})")
    a("--max_train_samples", type=int, default=None, help="use at most this many samples of each source (Fig. 8)")
    a("--resolution", type=int, default=768, help="square training resolution (images are squashed, as official)")
    a("--hflip_prob", type=float, default=0.5)
    a("--prompt", default=recipe.prompt, help="the fixed task prompt (appendix 6.2)")
    a("--train_batch_size", type=int, default=4, help="images per device per micro-batch")
    a("--gradient_accumulation_steps", type=int, default=8)
    a("--max_train_steps", type=int, default=30000, help="optimizer updates")
    a("--learning_rate", type=float, default=3e-5)
    a("--lr_scheduler", default="constant_with_warmup",
      choices=["constant", "constant_with_warmup", "linear", "cosine", "polynomial"])
    a("--lr_warmup_steps", type=int, default=2000)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.01)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
      help="default: accelerate's config; frozen teacher and VAE are stored in this precision")
    a("--seed", type=int, default=42)
    a("--dataloader_num_workers", type=int, default=2)
    a("--checkpointing_steps", type=int, default=1000)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--logging_dir", default="logs")
    # D³ objective
    a("--layer_set", default="up", help=f"aligned layers: one of {LAYER_SETS} or comma-separated module paths")
    a("--head_type", default="cleandift", choices=HEAD_TYPES, help="projection head (Table 7 ablation)")
    a("--num_timesteps", type=int, default=3, help="expert timesteps per image (stratified over [1, 999])")
    a("--student_timestep", type=float, default=261.0)
    a("--freeze_timestep", action="store_true", help="keep the student timestep fixed instead of learning it")
    a("--lambda_task", type=float, default=1.0, help="λ in L = L_agg + λ·L_task")
    a("--lambda_align", type=float, default=1.0, help="weight of L_agg (0 disables the alignment)")
    for term, weight in recipe.loss_weights.items():
        a(f"--lambda_{term}", type=float, default=weight, help=f"weight of the {term} term in L_task")
    a("--on_bad_sample", default="skip", choices=["skip", "error"])
    a("--max_nonfinite", type=int, default=10, help="stop after this many non-finite losses in a row")
    return p


# -------------------------------------------------------------------------------------------------------- the step
@dataclass
class StepOutput:
    loss: torch.Tensor
    align: torch.Tensor
    task_terms: dict[str, torch.Tensor]
    per_layer: dict[str, torch.Tensor]
    prediction: torch.Tensor  # decoded (B, 3, H, W)


def d3_step(
    model: D3Model,
    teacher: torch.nn.Module,
    teacher_capture: FeatureCapture,
    vae,
    scheduler,
    batch: dict,
    prompt_embeds: torch.Tensor,
    task_loss: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]],
    weights: dict[str, float],
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    lambda_task: float = 1.0,
    lambda_align: float = 1.0,
) -> StepOutput:
    """One D³ training step's losses: teacher once on B·N_T noisy latents, student and decoder once per image."""
    dtype = next(model.parameters()).dtype  # fp32 master weights in training (autocast does the rest)
    with torch.no_grad():
        latents = encode_image(vae, batch["rgb"]).to(dtype)
    expert = expert_features(teacher, teacher_capture, scheduler, latents, prompt_embeds, timesteps, noise)
    out = model(latents, prompt_embeds, expert, timesteps)
    prediction = decode_latent(vae, out.prediction)
    terms = task_loss(prediction, batch)
    task = sum(weights[k] * v for k, v in terms.items())
    loss = lambda_align * out.loss + lambda_task * task
    return StepOutput(loss, out.loss, terms, out.per_layer, prediction)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """Randomness of one micro-step derives from (seed, step) only, so a resumed run draws what an unbroken one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63 - 1))


def random_hflip(batch: dict, generator: torch.Generator, prob: float, flip_target) -> dict:
    if prob <= 0:
        return batch
    flip = torch.rand(batch["rgb"].shape[0], generator=generator) < prob
    if not flip.any():
        return batch
    out = dict(batch)
    for key in ("rgb", "target", "valid", "depth"):
        if key in batch:
            flipped = batch[key].flip(-1)
            if key == "target":
                flipped = flip_target(flipped)
            mask = flip.to(batch[key].device).view(-1, *([1] * (batch[key].dim() - 1)))
            out[key] = torch.where(mask, flipped, batch[key])
    return out


# ------------------------------------------------------------------------------------------------------------ data
class SkippingCollate:
    """Collate that drops unreadable samples (they arrive as BadSampleError messages) and reports them."""

    def __call__(self, items):
        good = [s for s in items if not isinstance(s, str)]
        bad = [s for s in items if isinstance(s, str)]
        batch = default_collate(good) if good else None
        return {"batch": batch, "bad": bad}


class SafeDataset(torch.utils.data.Dataset):
    """Wraps the training set: a bad sample becomes its error message (skip mode) or stops the run (error mode)."""

    def __init__(self, dataset, on_bad_sample: str):
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            return str(err)


def build_training_data(args, recipe: TaskRecipe):
    specs = args.dataset or recipe.default_datasets
    if not specs:
        raise SystemExit("error: no training data; pass --dataset PATH[:PROB] (see README, 'Training data')")
    sources, given = [], []
    for spec in specs:
        path, prob = parse_dataset_spec(spec)
        try:
            found = open_sources(path, recipe.modality, args.resolution, recipe.encode_target, args.max_train_samples)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        sources += found
        given += [prob] * len(found)
    probs = mixing_probabilities([s.name for s in sources], given, recipe.default_mixing)
    dataset = SafeDataset(concat(sources), args.on_bad_sample)
    sampler = MixedBatchSampler([len(s) for s in sources], probs, args.train_batch_size, seed=args.seed)
    return sources, probs, dataset, sampler


# ----------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its .tmp name)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "training_state").is_dir():
        raise SystemExit(f"error: {path}: not a d3 training checkpoint (no training_state/ inside)")
    return path


def export_predictor(path: Path, model: D3Model, vae, prompt_embeds: torch.Tensor, args, recipe: TaskRecipe) -> None:
    from .predictor import D3Config, save_checkpoint  # noqa: PLC0415 (predictor imports are inference-only)

    config = D3Config(
        task=recipe.task,
        student_timestep=float(model.student_timestep.detach().float()),
        prompt=args.prompt,
        processing_res=args.resolution,
        base_model=str(args.pretrained_model_name_or_path),
    )
    save_checkpoint(path, model.student, vae, prompt_embeds, config)


# ------------------------------------------------------------------------------------------------------------ loop
@dataclass
class TrainResult:
    output_dir: Path  # the exported inference checkpoint
    history: list[dict]  # the logged values of every optimizer step of this process (losses, lr, timestep)


def train(args: argparse.Namespace, recipe: TaskRecipe) -> TrainResult:
    """Run training; returns the exported checkpoint folder and the per-step log."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        backbone = load_backbone(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
    except Exception as err:
        raise SystemExit(f"error: {err}") from None
    prompt_embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, args.prompt)
    backbone.release_text_encoder()

    teacher = backbone.unet
    student = copy.deepcopy(teacher)
    teacher = cast_module(teacher.requires_grad_(False).eval(), accelerator.device, weight_dtype)
    vae = cast_module(backbone.vae.requires_grad_(False).eval(), accelerator.device, weight_dtype)
    student.train()
    layers = unet_layer_set(student, args.layer_set)
    heads = ProjectionHeads(layer_channels(student, layers), args.head_type)
    model = D3Model(student, heads, layers, args.student_timestep, learn_timestep=not args.freeze_timestep)
    teacher_capture = FeatureCapture(teacher, layers)
    prompt_embeds = prompt_embeds.to(accelerator.device)

    sources, probs, dataset, sampler = build_training_data(args, recipe)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.dataloader_num_workers,
        collate_fn=SkippingCollate(),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    weights = {term: getattr(args, f"lambda_{term}") for term in recipe.loss_weights}

    global_step, micro_step = 0, 0
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume / "training_state"))
        state = json.loads((resume / "training_state" / "trainer_state.json").read_text())
        global_step, micro_step = state["global_step"], state["micro_step"]
        accelerator.print(f"resumed from {resume} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}; starting a new run")

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"d3-{recipe.task}", config=tracker_config)
        for s, p in zip(sources, probs):
            logger.info("source %-10s %7d samples, p=%.3f (%s)", s.name, len(s), p, s.root)

    batches_per_epoch = len(sampler)
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(model)
    counters = {"bad_samples": 0, "nonfinite": 0, "nonfinite_in_row": 0}
    history: list[dict] = []
    cycle_nonfinite = False

    def save(step: int) -> None:
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "training_state"))
        if accelerator.is_main_process:
            (tmp / "training_state" / "trainer_state.json").write_text(
                json.dumps({"global_step": step, "micro_step": micro_step, **counters}))
            export_predictor(tmp, unwrapped, vae, prompt_embeds, args, recipe)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if args.checkpoints_total_limit:
                for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    while global_step < args.max_train_steps:
        epoch, skip = divmod(micro_step, batches_per_epoch)
        sampler.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for item in epoch_loader:
            micro_step += 1
            counters["bad_samples"] += len(item["bad"])
            for message in item["bad"]:
                logger.warning("skipped bad sample: %s", message)
            batch = item["batch"]
            generator = step_generator(args.seed, micro_step)
            with accelerator.accumulate(model):
                if batch is not None:
                    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    batch = random_hflip(batch, generator, args.hflip_prob, recipe.flip_target)
                    b = batch["rgb"].shape[0]
                    t = stratified_timesteps(b, args.num_timesteps, generator=generator).to(accelerator.device)
                    latent_shape = (b, args.num_timesteps, unwrapped.student.config.in_channels,
                                    args.resolution // vae_scale_factor(vae), args.resolution // vae_scale_factor(vae))
                    noise = torch.randn(latent_shape, generator=generator).to(accelerator.device)
                    with accelerator.autocast():
                        out = d3_step(model, teacher, teacher_capture, vae, backbone.scheduler, batch, prompt_embeds,
                                      recipe.task_loss, weights, t, noise, args.lambda_task, args.lambda_align)
                    if torch.isfinite(out.loss):
                        accelerator.backward(out.loss)
                        counters["nonfinite_in_row"] = 0
                    else:
                        cycle_nonfinite = True
                        counters["nonfinite"] += 1
                        counters["nonfinite_in_row"] += 1
                        logger.warning("non-finite loss at step %d (files: %s); update skipped",
                                       global_step + 1, ", ".join(batch["path"]))
                        if counters["nonfinite_in_row"] >= args.max_nonfinite:
                            raise SystemExit(
                                f"error: {counters['nonfinite_in_row']} non-finite losses in a row, last at step "
                                f"{global_step + 1} on files: {', '.join(batch['path'])}")
                if accelerator.sync_gradients:
                    if cycle_nonfinite:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            cycle_nonfinite = False
            global_step += 1
            progress.update(1)
            if batch is not None:
                logs = {"loss": out.loss.detach().item(), "loss/align": out.align.detach().item(),
                        "lr": lr_scheduler.get_last_lr()[0],
                        "student_timestep": unwrapped.student_timestep.detach().item(), **{
                            f"loss/{k}": v.detach().item() for k, v in out.task_terms.items()}}
                logs.update({f"align/{k}": v.detach().item() for k, v in out.per_layer.items()})
                logs.update({k: v for k, v in counters.items() if k != "nonfinite_in_row"})
                progress.set_postfix(loss=f"{logs['loss']:.4f}", t=f"{logs['student_timestep']:.1f}")
                accelerator.log(logs, step=global_step)
                history.append({"step": global_step, **logs})
            if global_step % args.checkpointing_steps == 0 or global_step >= args.max_train_steps:
                save(global_step)
            if global_step >= args.max_train_steps:
                break

    progress.close()
    final = output_dir
    if accelerator.is_main_process:
        export_predictor(final, unwrapped, vae, prompt_embeds, args, recipe)
        if counters["bad_samples"]:
            logger.warning("%d bad samples were skipped (see the warnings above)", counters["bad_samples"])
    accelerator.end_training()
    return TrainResult(final, history)


def main(recipe: TaskRecipe, argv: list[str] | None = None, description: str | None = None) -> None:
    args = build_parser(recipe, description).parse_args(argv)
    train(args, recipe)

