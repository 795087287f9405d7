"""The training loop shared by train_depth.py, train_normal.py and train_matting.py.

A task is a `TaskRecipe` (prompt, data modality, mixing defaults, target encoding, loss terms and weights); `train`
runs it: the D³ step, gradient accumulation, mixed precision, skipped non-finite updates, logging, checkpoints that
resume exactly, and the export of the inference folder. This module keeps the loop, read top to bottom; what it
calls lives beside it, one concern each: the flags in the light `d3.training_args` (re-exported here), the
Accelerator, model and optimizer in `d3.training_setup`, the data in `d3.training_data`, and the folders on disk
(checkpoints, resume, export) in `d3.training_checkpoints`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .latents import vae_scale_factor
from .objective import Objective, StepOutput, d3_step
from .run_lock import lock_output_dir
from .training_args import TaskRecipe, build_parser, validate_args  # noqa: F401  (the flags: a light module)
from .training_checkpoints import (checkpoint_exports, clean_interrupted_saves, export_predictor, gather_for_export,
                                   resume_training, save_training_checkpoint)
from .training_data import batch_to, build_training_data, make_loader, random_hflip, step_generator, stop_on_bad_sample
from .training_setup import (build_model, configure_deepspeed, make_accelerator, make_lr_scheduler, make_optimizer,
                             step_autocast)

logger = logging.getLogger("d3.train")


@dataclass
class TrainResult:
    output_dir: Path  # the exported inference checkpoint
    history: list[dict]  # the logged values of every optimizer step of this process (losses, lr, timestep)


@dataclass
class Agreement:
    """What every process knows alike after a micro-batch's forward (`agree`)."""

    finite: bool  # the loss is finite on every process
    with_data: int  # processes whose micro-batch held at least one readable sample
    bad: int  # unreadable samples over all processes


def agree(accelerator, loss: torch.Tensor | None, has_data: bool, bad: int) -> Agreement:
    """One gather after the forward, so that every process takes the same branch: a process that skipped backward,
    or a collective, alone would leave the others waiting in one it never joins (DDP's gradient all-reduce, FSDP's
    reduce-scatter, the gather here, the logging reduce). `loss` is None only for a single process without data."""
    if loss is None:
        return Agreement(True, 0, bad)
    local = torch.cat([torch.isfinite(loss.detach()).float().reshape(1),
                       torch.tensor([float(has_data), float(bad)], device=loss.device)])
    if accelerator.num_processes > 1:
        local = accelerator.gather(local)
    finite, with_data, bad_total = local.reshape(-1, 3).T.tolist()
    return Agreement(min(finite) > 0, int(sum(with_data)), int(sum(bad_total)))


def stand_in_batch(batch_size: int, resolution: int, device: torch.device) -> dict:
    """What a process runs when every sample of its micro-batch was unreadable while others have data: a black
    image of a full micro-batch's shape (the compiled graphs see no new shape), under `stand_in_objective`."""
    return {"rgb": torch.zeros(batch_size, 3, resolution, resolution, device=device)}


def stand_in_objective(objective: Objective) -> Objective:
    """The objective of a stand-in batch: zero-weighted, yet every trainable parameter is in its graph (the prediction
    reaches the student's last layer, the alignment term its hooked layers, heads and timestep), so DDP's reducer
    gets each gradient it waits for (all zeros). Its terms carry the task's names: the logging reduce needs the same
    values on every process."""
    return Objective(lambda prediction, batch: {k: prediction.float().mean() for k in objective.weights},
                     dict.fromkeys(objective.weights, 0.0), lambda_task=1.0, lambda_align=0.0)


def run_micro_batch(accelerator, model, unwrapped, parts, objective: Objective, batch: dict | None, bad: int, args,
                    recipe: TaskRecipe, generator: torch.Generator,
                    weight_dtype: torch.dtype = torch.float32) -> tuple[StepOutput | None, Agreement]:
    """One micro-batch: forward, the processes' agreement, and backward when every loss is finite. `parts` is
    (teacher, vae, prompt_embeds). Returns the step's output without its graph (None for a single process without
    data) and the agreement.

    A process whose micro-batch held no readable sample (`batch` None) still runs forward and backward on a
    zero-weighted stand-in while other processes have data, and the losses of those that have data are scaled by
    processes / processes with data, so that the update averages over the processes with data as it would without
    the empty one. A single process without data skips the micro-batch."""
    experts, vae, prompt_embeds = parts
    n = accelerator.num_processes
    if batch is None and n == 1:
        return None, agree(accelerator, None, False, bad)
    global_size = args.train_batch_size * n  # images per micro-step over all processes
    has_data = batch is not None
    batch = batch_to(batch, accelerator.device) if has_data else stand_in_batch(
        args.train_batch_size, args.resolution, accelerator.device)
    b = batch["rgb"].shape[0]
    # Each sample's randomness comes from (seed, step, its place in the global batch), never from the rank: every
    # process draws the global batch's values and keeps its own rows.
    start = accelerator.process_index * args.train_batch_size
    rows = slice(start, start + b)
    if has_data:
        batch = random_hflip(batch, generator, args.hflip_prob, recipe.flip_target, global_size, rows)
    t = unwrapped.denoiser.sample_timesteps(global_size, args.num_timesteps, generator=generator)
    t = t[rows].to(accelerator.device)
    latent_shape = (global_size, args.num_timesteps, unwrapped.denoiser.latent_channels,
                    args.resolution // vae_scale_factor(vae), args.resolution // vae_scale_factor(vae))
    noise = torch.randn(latent_shape, generator=generator)[rows].to(accelerator.device)
    with step_autocast(accelerator, weight_dtype):  # accelerate's autocast, or d3's own under DeepSpeed
        out = d3_step(model, experts, vae, prompt_embeds, objective if has_data else stand_in_objective(objective),
                       batch, t, noise)
    decision = agree(accelerator, out.loss, has_data, bad)
    if decision.finite:  # every process agrees, so none waits in backward alone
        scale = n / decision.with_data if has_data and decision.with_data < n else None
        accelerator.backward(out.loss if scale is None else out.loss * scale)
    return out.detach(), decision  # the graph goes now, not when the next step's forward replaces `out`


def step_logs(accelerator, out: StepOutput, has_data: bool, with_data: int, lr: float, counters: dict,
              shares: dict) -> dict:
    """What one optimizer step logs: its losses (the mean over the processes that had data, as one process would
    log it), the learning rate, the student's timestep (the one this step's forward used: every process has it, even
    where FSDP shards the parameter), the run's counters and `shares` (mix/<source>: its share of the batches so
    far). A collective when several processes run: every process calls it."""
    losses = {"loss": out.loss, "loss/align": out.align, **{f"loss/{k}": v for k, v in out.task_terms.items()},
              **{f"align/{k}": v for k, v in out.per_layer.items()}}
    values = torch.stack([v.detach().float() for v in losses.values()])
    if accelerator.num_processes > 1:
        if not has_data:  # a stand-in's losses are not the run's
            values = torch.zeros_like(values)
        values = accelerator.reduce(values, reduction="sum") / with_data
    values = torch.cat([values, out.timestep.detach().float().reshape(1).to(values.device)]).tolist()
    logs = dict(zip(losses, values[:-1]))
    logs.update({"lr": lr, "student_timestep": values[-1]})
    logs.update({k: v for k, v in counters.items() if k != "nonfinite_in_row"})
    logs.update(shares)
    return logs


def train(args: argparse.Namespace, recipe: TaskRecipe, make_validation=None) -> TrainResult:
    """Run training; returns the exported checkpoint folder and the per-step log. `make_validation(args, recipe)`
    (`d3.validation.Validation`, which `d3.train_cli` passes with --validation_dataset) scores the student during
    training: built before the model loads, then `attach`ed once and called `after_step` every update."""
    if getattr(args, "validation_dataset", None) and make_validation is None:
        raise ValueError("--validation_dataset needs make_validation=d3.validation.Validation (d3.train_cli passes it)")
    validation = make_validation(args, recipe) if getattr(args, "validation_dataset", None) else None
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    _run_lock = lock_output_dir(output_dir, accelerator.is_main_process)  # held until train() returns; d3/run_lock.py
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_interrupted_saves(output_dir)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    configure_deepspeed(accelerator, args, weight_dtype)  # before prepare; DeepSpeed's bf16 is replaced by autocast
    model, experts, vae, prompt_embeds = build_model(args, accelerator.device, weight_dtype)
    sources, probs, dataset, sampler = build_training_data(args, recipe, accelerator.num_processes,
                                                           accelerator.process_index)
    loader = make_loader(dataset, sampler, args.dataloader_num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    objective = Objective(recipe.task_loss, {term: getattr(args, f"lambda_{term}") for term in recipe.loss_weights},
                          args.lambda_task, args.lambda_align)

    resumed = resume_training(accelerator, output_dir, args.resume_from_checkpoint)  # its trainer state, or None
    global_step, micro_step = (0, 0) if resumed is None else (resumed["global_step"], resumed["micro_step"])
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"d3-{recipe.task}", config=tracker_config)
        logger.info("mixing %s: %d batches per epoch", args.mixing, len(sampler))
        for s, p, share in zip(sources, probs, sampler.expected_shares()):
            logger.info("source %-10s %7d samples, p=%.3f, expected share of batches per epoch %.2f (%s)",
                        s.name, len(s), p, share, s.root)

    batches_per_epoch = len(sampler)
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(model)
    counters = {"bad_samples": 0, "nonfinite": 0, "nonfinite_in_row": 0}
    if resumed is not None:  # the logged totals go on across a resume
        counters.update({k: int(v) for k, v in resumed.items() if k in counters})
    history: list[dict] = []
    cycle_nonfinite = cycle_data = False

    def export(path: Path, full_state: dict | None) -> None:  # the inference folder: a checkpoint's or the run's
        export_predictor(path, unwrapped, vae, prompt_embeds, args, recipe, full_state)

    if validation is not None:  # d3/validation.py: restores the best so far; step 0 with --validate_at_start
        validation.attach(accelerator, unwrapped, vae, prompt_embeds, export, output_dir, global_step,
                          resumed is not None)
    while global_step < args.max_train_steps:
        epoch, skip = divmod(micro_step, batches_per_epoch)
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed * 100_003 + epoch)  # same worker seeds per epoch, resumed or not
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for item in stop_on_bad_sample(epoch_loader):
            micro_step += 1
            for message in item["bad"]:
                logger.warning("skipped bad sample: %s", message)
            batch = item["batch"]
            with accelerator.accumulate(model):
                out, decision = run_micro_batch(accelerator, model, unwrapped, (experts, vae, prompt_embeds), objective,
                                                batch, len(item["bad"]), args, recipe,
                                                step_generator(args.seed, micro_step), weight_dtype)
                counters["bad_samples"] += decision.bad  # over all processes: every process holds the run's count
                cycle_data |= decision.with_data > 0
                if not decision.finite:  # skipped on every process (a stand-in's too: its zero would be NaN)
                    cycle_nonfinite = True
                    counters["nonfinite"] += 1
                    counters["nonfinite_in_row"] += 1
                    files = ", ".join(batch["path"]) if batch is not None else "none readable on this process"
                    logger.warning("non-finite loss at step %d (files: %s); update skipped", global_step + 1, files)
                    if counters["nonfinite_in_row"] >= args.max_nonfinite:
                        raise SystemExit(
                            f"error: {counters['nonfinite_in_row']} non-finite losses in a row, last at step "
                            f"{global_step + 1} on files: {files}")
                elif decision.with_data:
                    counters["nonfinite_in_row"] = 0
                if accelerator.sync_gradients:
                    if cycle_nonfinite or not cycle_data:  # nothing to learn from: no update, the schedule waits
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        # all of the model's parameters: under FSDP accelerate clips only when given exactly those
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            cycle_nonfinite = cycle_data = False
            global_step += 1
            progress.update(1)
            if decision.with_data:  # every process agrees on this, and step_logs is a collective
                logs = step_logs(accelerator, out, batch is not None, decision.with_data, lr_scheduler.get_last_lr()[0],
                                 counters, sampler.running_shares(micro_step))
                progress.set_postfix(loss=f"{logs['loss']:.4f}", t=f"{logs['student_timestep']:.1f}")
                accelerator.log(logs, step=global_step)
                history.append({"step": global_step, **logs})
            if validation is not None:
                validation.after_step(global_step)
            if global_step % args.checkpointing_steps == 0 or global_step >= args.max_train_steps:
                save_training_checkpoint(accelerator, model, output_dir, global_step,
                                         {"global_step": global_step, "micro_step": micro_step, **counters},
                                         export if checkpoint_exports(global_step, args) else None,
                                         args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break

    progress.close()
    final = output_dir
    full_state = gather_for_export(accelerator, model)
    if accelerator.is_main_process:
        export(final, full_state)
        if counters["bad_samples"]:
            logger.warning("%d bad samples were skipped (see the warnings above)", counters["bad_samples"])
    if accelerator.is_main_process and getattr(args, "log_history", None):
        Path(args.log_history).write_text(json.dumps(history, indent=1))
    accelerator.end_training()
    if accelerator.is_main_process:  # the run's last line: where the inference folder is
        print(f"model saved to {final.resolve()}", flush=True)
    return TrainResult(final, history)
