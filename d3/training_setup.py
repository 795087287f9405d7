"""What a training run is built from before its first step: the Accelerator, the student, frozen teacher, VAE and
heads as one `D3Model`, the engine settings (checkpointing, channels-last, compilation, TF32) and the optimizer.

Separate from the loop (`d3.training`) so that the loop reads as the step sequence, and so that the benchmarks build
the same model and optimizer as a run does.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

from .backbone import encode_condition, load_backbone
from .denoisers import Denoiser
from .devices import cast_module
from .heads import ProjectionHeads
from .lora import add_lora
from .objective import D3Model, Teacher
from .official_release import OfficialCheckpointError, load_official_training_state

logger = logging.getLogger("d3.train")


def launched_with_fsdp(environ=os.environ) -> bool:
    """Whether `accelerate launch` set this process up for FSDP (an FSDP config, or --use_fsdp); read as accelerate's
    state reads it."""
    return environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accumulation_settings(args, fsdp: bool) -> dict:
    """Accelerator keywords for gradient accumulation. Under FSDP, accumulating without synchronising (accelerate's
    default: `no_sync` between updates) keeps full, unsharded gradients on every process (FLUX.1-dev: 14.1 B
    parameters, 28 GB in bf16); reducing each micro-batch's gradients to their shards (`sync_each_batch`) costs one
    reduce-scatter per micro-batch instead and keeps only the shard."""
    if not fsdp:
        return {"gradient_accumulation_steps": args.gradient_accumulation_steps}
    return {"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps,
                                                                       sync_each_batch=True)}


def make_accelerator(args, output_dir: Path) -> Accelerator:
    """The run's Accelerator: accumulation, mixed precision, trackers, the process group's timeout (--ddp_timeout),
    and its project folder."""
    report_to = None if args.report_to in (None, "none") else args.report_to
    # Several processes on a machine without CUDA (torchrun / accelerate on CPUs) form a gloo group only with cpu=True.
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_group,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        **accumulation_settings(args, launched_with_fsdp()),
    )


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
        from torch._dynamo import config as dynamo_config  # noqa: PLC0415  (slow to import; only with --compile)

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


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) has a kernel


def adamw(params, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the run's hyper-parameters; torch's fused kernel on CUDA and on the CPU unless opted out.

    Fused means one pass over each parameter's memory instead of a chain of element-wise ops with temporaries. On
    the CPU the update is memory-bound: for 110 M parameters on a 2-core CPU the foreach update took 5.7
    times as long as the fused one (benchmarks/train_step.py prints the update's time per step)."""
    fused = device.type in FUSED_ADAMW_DEVICES and not getattr(args, "no_fused_adam", False)
    return torch.optim.AdamW(params, **adam_hyperparameters(args), fused=fused or None)


def make_optimizer(params, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (states in 2 bytes per parameter instead of 8) with --use_8bit_adam."""
    if not getattr(args, "use_8bit_adam", False):
        return adamw(params, args, device)
    try:
        import bitsandbytes as bnb  # noqa: PLC0415  (optional: only with --use_8bit_adam)
    except ImportError:
        raise SystemExit("error: --use_8bit_adam needs bitsandbytes and a CUDA GPU (pip install bitsandbytes)") from None
    return bnb.optim.AdamW8bit(params, **adam_hyperparameters(args))


def build_student_and_teacher(args, backbone, device, weight_dtype) -> tuple[Denoiser, Denoiser]:
    """The trainable student and the frozen teacher ("visual experts"), as Denoisers of the backbone's model.

    Full fine-tuning: the student is an fp32 copy, the teacher the original cast to `weight_dtype`. LoRA: one
    model in `weight_dtype` with fp32 adapters; the teacher is the same model with its adapters switched off.
    """
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


def build_model(args, device: torch.device, weight_dtype: torch.dtype):
    """Load the backbone and build what the step needs: the `D3Model` (student, heads, its timestep), the teacher
    as `Teacher`, the frozen VAE and the prompt's conditioning on `device`, with the speed flags applied.
    Returns (model, experts, vae, prompt_embeds)."""
    try:
        backbone = load_backbone(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
    except Exception as err:
        raise SystemExit(f"error: {err}") from None
    condition = encode_condition(backbone, args.prompt)  # UNet: {"encoder_hidden_states"}; DiT: + pooled, guidance
    backbone.release_text_encoder()
    prompt_embeds = condition["encoder_hidden_states"] if backbone.architecture == "unet" else condition

    student, teacher = build_student_and_teacher(args, backbone, device, weight_dtype)
    vae = cast_module(backbone.vae.requires_grad_(False).eval(), device, weight_dtype)
    try:
        layers = student.layer_set(args.layer_set)
    except ValueError as err:
        raise SystemExit(f"error: --layer_set: {err}") from None
    heads = ProjectionHeads(student.feature_channels(layers), args.head_type, student.head_names(layers))
    model = D3Model(student, heads, layers, args.student_timestep, learn_timestep=not args.freeze_timestep)
    if getattr(args, "init_from", None):
        try:
            counts = load_official_training_state(args.init_from, model)
        except OfficialCheckpointError as err:
            raise SystemExit(f"error: --init_from: {err}") from None
        logger.info("initialised from %s: %s", args.init_from, counts)
    # A LoRA teacher is the student's own network: one set of hooks serves both passes (each pass pops its own).
    experts = Teacher(teacher, model.capture if teacher.model is student.model else teacher.feature_capture(layers),
                      backbone.scheduler)
    prompt_embeds = (prompt_embeds.to(device) if torch.is_tensor(prompt_embeds)
                     else {k: v.to(device) for k, v in prompt_embeds.items()})
    set_tf32(args.allow_tf32)
    apply_speed_flags(model, teacher.model, vae, gradient_checkpointing=args.gradient_checkpointing,
                      channels_last=args.channels_last, compile=args.compile)
    return model, experts, vae, prompt_embeds
