"""What a training run is built from before its first step: the Accelerator, the student, frozen teacher, VAE and
heads as one `D3Model`, the engine settings (checkpointing, channels-last, compilation, TF32) and the optimizer.

Separate from the loop (`d3.training`) so that the loop reads as the step sequence, and so that the benchmarks build
the same model and optimizer as a run does.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

from .backbone import encode_condition, load_backbone
from .checkpoint import cast_keeping_export_weights
from .denoisers import Denoiser
from .devices import cast_copy, cast_module, compile_settings
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
    encoder runs under no_grad, so only the decoder is affected); the projection heads recompute each layer's head
    and cosine in the backward pass. Compilation is shape-specialised (dynamic=False):
    training has one resolution, so there is one graph per module and batch shape; hooks are registered before.
    """
    if gradient_checkpointing:
        model.student.enable_gradient_checkpointing()
        model.heads.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if channels_last:
        for module in (model.student, teacher, vae):
            module.to(memory_format=torch.channels_last)
    if compile:
        compile_settings(checkpointing=gradient_checkpointing)
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


def scheduler_steps_per_update(accelerator) -> int:
    """How many times the prepared LR scheduler steps per optimizer update; the schedule's lengths are multiplied by it.

    d3's scheduler is diffusers' LambdaLR. accelerate hands a client scheduler to DeepSpeed's engine (which would step
    it once per update) only when it is one of DeepSpeed's own classes (`deepspeed.runtime.lr_schedules.
    VALID_LR_SCHEDULES`; so in accelerate 1.0, 1.5, 1.10, 1.13, 1.15 and main). So under every distributed type,
    DeepSpeed included, it is wrapped in `AcceleratedScheduler`, which steps it once per process and update
    (`AcceleratorState().num_processes` times) unless batches are split. That count is accelerate's, not the process
    group's: with several CPU processes under DeepSpeed accelerate reports 1 per rank while DeepSpeed sees them all,
    and the wrapper then steps once per update, so the schedule is built for 1 there too."""
    if accelerator.split_batches or not accelerator.step_scheduler_with_optimizer:
        return 1
    return accelerator.num_processes


def make_lr_scheduler(optimizer, args, accelerator):
    """The run's LR schedule, counted in optimizer updates (--lr_warmup_steps, --max_train_steps)."""
    from diffusers.optimization import get_scheduler  # noqa: PLC0415  (diffusers is slow to import)

    per_update = scheduler_steps_per_update(accelerator)
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * per_update,
                         num_training_steps=args.max_train_steps * per_update)


def configure_deepspeed(accelerator, args, weight_dtype: torch.dtype) -> None:
    """Before `accelerator.prepare` under DeepSpeed (else nothing): the values accelerate cannot infer, and d3's
    precision contract.

    - No DataLoader goes through `prepare` (d3 shards the data itself), so the micro-batch size is set here;
      accumulation and clipping come from --gradient_accumulation_steps and --max_grad_norm, as in every other launch.
    - DeepSpeed's own bf16 mode would cast the whole D3Model to bf16 (the learned timestep 261 becomes 260 and steps
      of ~3e-5 never move it; the export would be bf16). Instead the model stays fp32, as under DDP, and the step runs
      under bf16 autocast: DeepSpeed's `torch_autocast` for the engine's forward (with no lower-precision gradient
      communication) and `step_autocast` around the rest. ZeRO-2 still shards the fp32 gradients and AdamW states.
    - A non-finite loss skips the update by not calling backward; with accumulation the earlier micro-batches of
      the cycle are already inside the engine, which steps on its own at the boundary: refused.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if accelerator.gradient_accumulation_steps != 1 or args.gradient_accumulation_steps != 1:
        raise SystemExit(
            f"error: --gradient_accumulation_steps {args.gradient_accumulation_steps}: DeepSpeed runs take 1 (the "
            "default is 16): with accumulation a non-finite loss could not skip its update, because the engine "
            "already holds the cycle's earlier micro-batches; grow the batch with --train_batch_size and the number of GPUs, "
            "or use configs/multi_gpu.yaml")
    if weight_dtype == torch.float16:
        raise SystemExit("error: --mixed_precision fp16: DeepSpeed runs take bf16 or no (d3 keeps the model fp32 "
                         "under autocast, and fp16 autocast would need a gradient scaler DeepSpeed does not run)")
    config = plugin.deepspeed_config
    if config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise SystemExit("error: DeepSpeed ZeRO-3 is not supported (d3 exports the student from the engine's module, "
                         "whose weights ZeRO-3 partitions); use configs/deepspeed_zero2.yaml")
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = args.train_batch_size * accelerator.num_processes
    config["gradient_clipping"] = args.max_grad_norm
    config["fp16"] = {"enabled": False}
    config["bf16"] = {"enabled": False}
    if weight_dtype == torch.bfloat16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def step_autocast(accelerator, weight_dtype: torch.dtype):
    """The step's autocast context: accelerate's, except under DeepSpeed, where accelerate's is a no-op (DeepSpeed
    owns precision) and d3 autocasts the teacher, VAE and losses itself (see `configure_deepspeed`)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    return accelerator.autocast()


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
    # The teacher is a copy made straight in `weight_dtype` on `device` (devices.cast_copy): a deepcopy of the fp32
    # model first would hold a second fp32 model in host memory (FLUX.1-dev: 48 GB more per process at start-up).
    teacher = type(base)(cast_copy(base.model, device, weight_dtype).requires_grad_(False).eval(),
                         backbone.scheduler)
    student = type(base)(base.model.train(), backbone.scheduler)
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
    # bf16/fp16 for the step; the checkpoints get the pretrained fp32 VAE, not this cast
    vae = cast_keeping_export_weights(backbone.vae.requires_grad_(False).eval(), device, weight_dtype)
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
