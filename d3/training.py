"""The training machinery shared by train_depth.py, train_normal.py and train_matting.py.

A task is a `TaskRecipe` (prompt, data modality, mixing defaults, target encoding, loss terms and weights); this
module owns everything else: the D³ step, gradient accumulation, mixed precision, checkpoints that resume exactly,
logging, and the export of the inference folder. The flags (in the style of the diffusers training examples) and
their checks live in the light `d3.training_args` and are re-exported here.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .backbone import encode_condition, load_backbone
from .checkpoint import D3Config, save_checkpoint
from .denoisers import Denoiser
from .data.folders import BadSampleError, collate, open_sources
from .data.mixing import RankSlice, concat, make_sampler, mixing_probabilities, parse_dataset_spec
from .devices import cast_module
from .heads import ProjectionHeads
from .latents import vae_scale_factor
from .objective import D3Model, Objective, Teacher, d3_step
from .training_args import TaskRecipe, build_parser, validate_args  # noqa: F401  (the flags: a light module)

logger = logging.getLogger("d3.train")


def apply_speed_flags(model: D3Model, teacher: torch.nn.Module, vae, *, gradient_checkpointing: bool = False,
                      channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor") -> None:
    """Engine settings that keep the step's mathematics (the equivalence tests run with them).

    Checkpointing trades ~30% more student/decoder compute for activations kept only at block boundaries (the
    encoder runs under no_grad, so only the decoder is affected). Compilation is shape-specialised (dynamic=False):
    training has one resolution, so there is one graph per module and batch shape; hooks are registered before.
    """
    if gradient_checkpointing:
        model.student.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if channels_last:
        for module in (model.student, teacher, vae):
            module.to(memory_format=torch.channels_last)
    if compile:
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        for module in (model.student, teacher, vae.encoder, vae.decoder):
            module.compile(backend=compile_backend, dynamic=False)


def set_tf32(allow: bool) -> None:
    """TF32 tensor cores for fp32 matmuls (off by default in torch) and convolutions (on by default); without the
    flag torch's defaults stay."""
    if allow:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adam_hyperparameters(args) -> dict:
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                eps=args.adam_epsilon)


def adamw(params, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the run's hyper-parameters; the fused CUDA kernel (one launch for all tensors) unless opted out."""
    fused = device.type == "cuda" and not getattr(args, "no_fused_adam", False)
    return torch.optim.AdamW(params, **adam_hyperparameters(args), fused=fused or None)


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one process skipping backward alone would hang the others)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    return bool(finite.min() > 0)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """Randomness of one micro-step derives from (seed, step) only, so a resumed run draws what an unbroken one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63 - 1))


def random_hflip(batch: dict, generator: torch.Generator, prob: float, flip_target, global_size: int | None = None,
                 rows: slice | None = None) -> dict:
    """Flip each image (and its target and native ground truth) left-right with probability `prob`; `flip_target`
    fixes values that change with the flip (the x component of normals). The draw covers the global batch of
    `global_size` images, of which this process holds `rows`."""
    if prob <= 0:
        return batch
    n = batch["rgb"].shape[0]
    flip = torch.rand(global_size or n, generator=generator)[rows or slice(0, n)] < prob
    if not flip.any():
        return batch
    out = dict(batch)
    for key in ("rgb", "target", "gt", "valid"):
        if key not in batch:
            continue
        fix = flip_target if key in ("target", "gt") else (lambda x: x)
        out[key] = [fix(x.flip(-1)) if f else x for x, f in zip(batch[key], flip.tolist())]
        if torch.is_tensor(batch[key]):
            out[key] = torch.stack(out[key])
    return out


# ------------------------------------------------------------------------------------------------------------ data
def batch_to(batch: dict, device: torch.device) -> dict:
    """Tensors, and lists of tensors (native-size ground truth), to `device`; other entries unchanged."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return [x.to(device, non_blocking=True) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


class SkippingCollate:
    """Collate that drops unreadable samples (they arrive as BadSampleError messages) and reports them."""

    def __call__(self, items):
        good = [s for s in items if not isinstance(s, str)]
        bad = [s for s in items if isinstance(s, str)]
        batch = collate(good) if good else None
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


def stop_on_bad_sample(loader):
    """Iterate a loader; in --on_bad_sample error mode, a bad sample stops the run with one line naming its file."""
    try:
        yield from loader
    except BadSampleError as err:
        # From a worker process the message carries the worker's traceback; its last line is the cause.
        cause = str(err).strip().splitlines()[-1].split("BadSampleError: ", 1)[-1]
        raise SystemExit(f"error: bad training sample: {cause} (--on_bad_sample skip skips and counts such "
                         "samples)") from None


def build_training_data(args, recipe: TaskRecipe, num_processes: int = 1, process_index: int = 0):
    """Sources, their mixing probabilities, the dataset and this process's batch sampler. The sampler draws global
    batches of `train_batch_size × num_processes` and hands this process its slice (`RankSlice`)."""
    specs = args.dataset or recipe.default_datasets
    if not specs:
        raise SystemExit("error: no training data; pass --dataset PATH[:PROB] (see README, 'Training data')")
    sources, given = [], []
    for spec in specs:
        path, prob = parse_dataset_spec(spec)
        try:
            found = open_sources(path, recipe.modality, args.resolution, recipe.encode_target, args.max_train_samples,
                                 loss_resolution=getattr(args, "loss_resolution", "native"))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        sources += found
        given += [prob] * len(found)
    defaults = recipe.paper_mixing if args.mixing == "paper" and recipe.paper_mixing else recipe.default_mixing
    names = [s.name for s in sources]
    probs = mixing_probabilities(names, given, defaults)
    dataset = SafeDataset(concat(sources), args.on_bad_sample)
    try:
        sampler = make_sampler(args.mixing, [len(s) for s in sources], probs, args.train_batch_size * num_processes,
                               args.seed, names)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if num_processes > 1:
        sampler = RankSlice(sampler, process_index, num_processes)
    return sources, probs, dataset, sampler


# ----------------------------------------------------------------------------------------------------- checkpoints
# accelerate logs every file of `save_state` at INFO, naming the temporary .checkpoint-N.tmp folder the state is written
# to before its rename; `save` silences them and logs the final checkpoint-N folder itself.
ACCELERATE_SAVE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING):
    """Raise the named loggers' level to `level` (warnings and errors still pass) for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its .tmp name)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def clean_interrupted_saves(output_dir: Path) -> None:
    """Tidy what a run killed inside `save` left: a half-written `.checkpoint-N.tmp` is removed; a `.checkpoint-N.old`
    (the previous checkpoint-N, set aside while its replacement was renamed in) goes back in place if the replacement
    never arrived, and is removed otherwise. A complete checkpoint is never deleted."""
    for partial in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    for aside in output_dir.glob(".checkpoint-*.old"):
        final = output_dir / aside.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


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


def export_predictor(path: Path, model: D3Model, vae, prompt_embeds, args, recipe: TaskRecipe,
                     full_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the inference folder. `full_state` is the D3Model's state dict gathered from FSDP shards (else None)."""
    timestep = model.student_timestep if full_state is None else full_state["student_timestep"]
    student_state = None if full_state is None else {
        k[len("student."):]: v for k, v in full_state.items() if k.startswith("student.")}
    adapter = getattr(args, "lora_rank", 0) > 0 and getattr(args, "save_lora_as", "merged") == "adapter"
    config = D3Config(
        task=recipe.task,
        student_timestep=float(timestep.detach().float()),
        prompt=args.prompt,
        processing_res=args.resolution,
        base_model=str(args.pretrained_model_name_or_path),
        architecture=model.denoiser.architecture,
        lora_adapter=f"{model.denoiser.subfolder}_lora" if adapter else "",
    )
    save_checkpoint(path, model.student, vae, prompt_embeds, config, state_dict=student_state)


def gather_for_export(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Under FSDP the student is sharded: gather its full state dict (a collective: every rank must call this)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.get_state_dict(model)


def build_student_and_teacher(args, backbone, device, weight_dtype) -> tuple[Denoiser, Denoiser]:
    """The trainable student and the frozen teacher ("visual experts"), as Denoisers of the backbone's model.

    Full fine-tuning: the student is an fp32 copy, the teacher the original cast to `weight_dtype`. LoRA: one
    model in `weight_dtype` with fp32 adapters; the teacher is the same model with its adapters switched off.
    """
    from .lora import add_lora

    base = backbone.denoiser()
    if getattr(args, "lora_rank", 0) > 0:
        model = cast_module(base.model, device, weight_dtype)
        add_lora(model, args.lora_rank, base.lora_targets, args.lora_alpha)
        student = type(base)(model.train(), backbone.scheduler)
        return student, student.without_adapters()
    student = type(base)(copy.deepcopy(base.model).train(), backbone.scheduler)
    teacher = type(base)(cast_module(base.model.requires_grad_(False).eval(), device, weight_dtype),
                         backbone.scheduler)
    return student, teacher


def make_optimizer(params, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (states in 2 bytes per parameter instead of 8) with --use_8bit_adam."""
    if not getattr(args, "use_8bit_adam", False):
        return adamw(params, args, device)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("error: --use_8bit_adam needs bitsandbytes and a CUDA GPU (pip install bitsandbytes)") from None
    return bnb.optim.AdamW8bit(params, **adam_hyperparameters(args))


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
    # Several processes on a machine without CUDA (torchrun / accelerate on CPUs) form a gloo group only with cpu=True.
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_group,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    from .run_lock import lock_output_dir  # noqa: PLC0415  (one run per output folder; before anything is loaded)

    _run_lock = lock_output_dir(output_dir, accelerator.is_main_process)  # held until train() returns; d3/run_lock.py
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_interrupted_saves(output_dir)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        backbone = load_backbone(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
    except Exception as err:
        raise SystemExit(f"error: {err}") from None
    condition = encode_condition(backbone, args.prompt)  # UNet: {"encoder_hidden_states"}; DiT: + pooled, guidance
    backbone.release_text_encoder()
    prompt_embeds = condition["encoder_hidden_states"] if backbone.architecture == "unet" else condition

    student, teacher = build_student_and_teacher(args, backbone, accelerator.device, weight_dtype)
    vae = cast_module(backbone.vae.requires_grad_(False).eval(), accelerator.device, weight_dtype)
    try:
        layers = student.layer_set(args.layer_set)
    except ValueError as err:
        raise SystemExit(f"error: --layer_set: {err}") from None
    heads = ProjectionHeads(student.feature_channels(layers), args.head_type, student.head_names(layers))
    model = D3Model(student, heads, layers, args.student_timestep, learn_timestep=not args.freeze_timestep)
    if getattr(args, "init_from", None):
        from .official_release import OfficialCheckpointError, load_official_training_state  # noqa: PLC0415

        try:
            counts = load_official_training_state(args.init_from, model)
        except OfficialCheckpointError as err:
            raise SystemExit(f"error: --init_from: {err}") from None
        logger.info("initialised from %s: %s", args.init_from, counts)
    # A LoRA teacher is the student's own network: one set of hooks serves both passes (each pass pops its own).
    experts = Teacher(teacher, model.capture if teacher.model is student.model else teacher.feature_capture(layers),
                     backbone.scheduler)
    prompt_embeds = (prompt_embeds.to(accelerator.device) if torch.is_tensor(prompt_embeds)
                     else {k: v.to(accelerator.device) for k, v in prompt_embeds.items()})
    set_tf32(args.allow_tf32)
    apply_speed_flags(model, teacher.model, vae, gradient_checkpointing=args.gradient_checkpointing,
                      channels_last=args.channels_last, compile=args.compile)

    sources, probs, dataset, sampler = build_training_data(args, recipe, accelerator.num_processes,
                                                           accelerator.process_index)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.dataloader_num_workers,
        collate_fn=SkippingCollate(),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
        # its own generator: a fresh iterator (each epoch, or a resume's skipping loader) draws the workers' base
        # seed from it, never from the global RNG that accelerate checkpoints, so a resumed run's RNG state is exact
        generator=torch.Generator(),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, accelerator.device)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    objective = Objective(recipe.task_loss, {term: getattr(args, f"lambda_{term}") for term in recipe.loss_weights},
                          args.lambda_task, args.lambda_align)

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
        logger.info("mixing %s: %d batches per epoch", args.mixing, len(sampler))
        for s, p, share in zip(sources, probs, sampler.expected_shares()):
            logger.info("source %-10s %7d samples, p=%.3f, expected share of batches per epoch %.2f (%s)",
                        s.name, len(s), p, share, s.root)

    batches_per_epoch = len(sampler)
    global_size = args.train_batch_size * accelerator.num_processes  # images per micro-step over all processes
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(model)
    counters = {"bad_samples": 0, "nonfinite": 0, "nonfinite_in_row": 0}
    if resume is not None:  # the logged totals go on across a resume
        counters.update({k: int(v) for k, v in state.items() if k in counters})
    history: list[dict] = []
    cycle_nonfinite = False

    def save(step: int) -> None:
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        with quiet_loggers(*ACCELERATE_SAVE_LOGGERS):  # they would name the .tmp folder; the line below names the final
            accelerator.save_state(str(tmp / "training_state"))
        full_state = gather_for_export(accelerator, model)
        if accelerator.is_main_process:
            (tmp / "training_state" / "trainer_state.json").write_text(
                json.dumps({"global_step": step, "micro_step": micro_step, **counters}))
            export_predictor(tmp, unwrapped, vae, prompt_embeds, args, recipe, full_state)
            aside = output_dir / f".checkpoint-{step}.old"
            if final.exists():  # an existing checkpoint-N is set aside, not deleted, until the new one is in place
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
            logger.info("checkpoint saved to %s", final)
            if args.checkpoints_total_limit:
                for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    while global_step < args.max_train_steps:
        epoch, skip = divmod(micro_step, batches_per_epoch)
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed * 100_003 + epoch)  # same worker seeds per epoch, resumed or not
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for item in stop_on_bad_sample(epoch_loader):
            micro_step += 1
            counters["bad_samples"] += len(item["bad"])
            for message in item["bad"]:
                logger.warning("skipped bad sample: %s", message)
            batch = item["batch"]
            generator = step_generator(args.seed, micro_step)
            with accelerator.accumulate(model):
                if batch is not None:
                    batch = batch_to(batch, accelerator.device)
                    b = batch["rgb"].shape[0]
                    # Each sample's randomness comes from (seed, step, its place in the global batch), never from the
                    # rank: every process draws the global batch's values and keeps its own rows.
                    rows = slice(accelerator.process_index * args.train_batch_size,
                                 accelerator.process_index * args.train_batch_size + b)
                    batch = random_hflip(batch, generator, args.hflip_prob, recipe.flip_target, global_size, rows)
                    t = unwrapped.denoiser.sample_timesteps(global_size, args.num_timesteps, generator=generator)
                    t = t[rows].to(accelerator.device)
                    latent_shape = (global_size, args.num_timesteps, unwrapped.denoiser.latent_channels,
                                    args.resolution // vae_scale_factor(vae), args.resolution // vae_scale_factor(vae))
                    noise = torch.randn(latent_shape, generator=generator)[rows].to(accelerator.device)
                    with accelerator.autocast():
                        out = d3_step(model, experts, vae, prompt_embeds, objective, batch, t, noise)
                    if all_finite(accelerator, out.loss):  # every process agrees, so none waits in backward alone
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
                        # all of the model's parameters: under FSDP accelerate clips only when given exactly those
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            cycle_nonfinite = False
            global_step += 1
            progress.update(1)
            if batch is not None:
                losses = {"loss": out.loss, "loss/align": out.align, **{f"loss/{k}": v for k, v in out.task_terms.items()},
                          **{f"align/{k}": v for k, v in out.per_layer.items()}}
                values = torch.stack([v.detach().float() for v in losses.values()])
                if accelerator.num_processes > 1:  # the global batch's mean, as one process would log it
                    values = accelerator.reduce(values, reduction="mean")
                logs = dict(zip(losses, values.tolist()))
                logs.update({"lr": lr_scheduler.get_last_lr()[0],
                             "student_timestep": unwrapped.student_timestep.detach().item()})
                logs.update({k: v for k, v in counters.items() if k != "nonfinite_in_row"})
                logs.update(sampler.running_shares(micro_step))  # mix/<source>: its share of the batches so far
                progress.set_postfix(loss=f"{logs['loss']:.4f}", t=f"{logs['student_timestep']:.1f}")
                accelerator.log(logs, step=global_step)
                history.append({"step": global_step, **logs})
            if global_step % args.checkpointing_steps == 0 or global_step >= args.max_train_steps:
                save(global_step)
            if global_step >= args.max_train_steps:
                break

    progress.close()
    final = output_dir
    full_state = gather_for_export(accelerator, model)
    if accelerator.is_main_process:
        export_predictor(final, unwrapped, vae, prompt_embeds, args, recipe, full_state)
        if counters["bad_samples"]:
            logger.warning("%d bad samples were skipped (see the warnings above)", counters["bad_samples"])
    if accelerator.is_main_process and getattr(args, "log_history", None):
        Path(args.log_history).write_text(json.dumps(history, indent=1))
    accelerator.end_training()
    if accelerator.is_main_process:  # the run's last line: where the inference folder is
        print(f"model saved to {final.resolve()}", flush=True)
    return TrainResult(final, history)
