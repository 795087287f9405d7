"""Training-step speed and memory: d3's step against the official-style reference, in one run, same settings.

    python benchmarks/train_step.py --backbone tiny --resolution 64 --batch_size 2            # CPU smoke size
    python benchmarks/train_step.py --backbone sd21 --resolution 768 --batch_size 1 \\
        --channels_last --compile                                                           # an H100, bf16

Both sides run a full optimizer step (forward under autocast, backward, gradient clipping, AdamW) on the same model,
optimizer, micro-batch, precision and device:
- ours: `d3.objective.d3_step`: the teacher once on the B·N_T noisy latents, the student and the VAE decoder once
  per image;
- reference: `d3/reference_step.py` (the per-copy batching of the authors' code): student and decoder on all N_T copies,
  plus the unused target encode of the official loop.
Engine settings (bf16 frozen teacher and VAE, fused SDPA, channels_last, torch.compile, TF32, fused AdamW) apply to
both sides; gradient checkpointing is a memory-for-compute choice of our trainer and applies to ours only unless
`--reference_gradient_checkpointing`. The `sd21` backbone is SD 2.1-shaped with random weights (built once into
`--cache_dir`); `--backbone_dir` takes any diffusers SD folder instead, e.g. the real SD 2.1. A side that runs out
of memory is reported as such (at 768² the reference needs about three times our activation memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE,
    PeakMemory,
    Row,
    attention_kind,
    count_flops,
    default_resolution,
    describe_device,
    ensure_backbone,
    goal_lines,
    is_oom,
    memory_baseline,
    peak_tflops,
    pick_device,
    print_table,
    set_threads,
    synchronize,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["tiny", "sd21"], default="tiny",
                   help="tiny: the test backbone; sd21: SD 2.1 shapes with random weights (for the GPU)")
    p.add_argument("--backbone_dir", default=None, help="a diffusers SD folder to use instead of --backbone")
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                   help="where built backbones are kept (default: $D3_BENCH_CACHE or ~/.cache/d3-benchmarks)")
    p.add_argument("--resolution", type=int, default=None, help="square training size (default: 64 tiny, 768 sd21)")
    p.add_argument("--batch_size", type=int, default=2, help="images per micro-batch")
    p.add_argument("--num_timesteps", type=int, default=3, help="expert timesteps per image (N_T)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="mixed precision as in training (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation happens here)")
    p.add_argument("--iterations", type=int, default=3, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=2, help="the sides alternate this many times (drift affects both)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="ours: recompute student UNet, heads and "
                   "VAE decoder activations in the backward pass")
    p.add_argument("--reference_gradient_checkpointing", action="store_true",
                   help="give the reference gradient checkpointing as well")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile student, teacher and VAE (both sides)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--no_fused_adam", action="store_true", help="use the foreach AdamW even on CUDA")
    p.add_argument("--skip_reference", action="store_true", help="measure ours only")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (one extra eager step per side)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense peak for the physical-limit line (default: 790 on an H100)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def synthetic_batch(batch_size: int, resolution: int, device: torch.device, seed: int) -> dict:
    """A depth batch with the training loader's keys; the values do not matter for speed, the shapes do."""
    from train_depth import encode_depth_target

    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1
    depth = torch.rand(batch_size, 1, resolution, resolution, generator=g) * 10 + 0.5
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[:, :, : resolution // 8] = False  # some invalid pixels, as in real data
    target = torch.stack([encode_depth_target({"depth": d, "valid": v}) for d, v in zip(depth, valid)])
    batch = {"rgb": rgb, "gt": depth * valid, "valid": valid, "target": target}  # ground truth at the training size
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["path"] = [f"synthetic-{i}" for i in range(batch_size)]
    return batch


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Bench:
    """The shared model, optimizer and batch, and one optimizer step of either side."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        import train_depth
        from d3.latents import vae_scale_factor
        from d3.devices import cast_module
        from d3.training_setup import adamw, apply_speed_flags
        from d3.reference_step import build_parts

        self.args, self.device = args, device
        self.dtype = weight_dtype(args.precision, device)
        backbone = ensure_backbone(args.backbone, args.cache_dir, args.backbone_dir)
        parts = build_parts(backbone, prompt=train_depth.PROMPT, perturb_heads=False, seed=args.seed)
        # As in d3.training_setup.build_model: frozen teacher and VAE stored in the mixed-precision dtype, trainables in fp32.
        parts.teacher = cast_module(parts.teacher, device, self.dtype)
        parts.vae = cast_module(parts.vae, device, self.dtype)
        parts.model.to(device)
        parts.prompt_embeds = parts.prompt_embeds.to(device)
        self.parts = parts
        apply_speed_flags(parts.model, parts.teacher, parts.vae, channels_last=args.channels_last)
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        ns = argparse.Namespace(learning_rate=1e-12, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.01,
                                adam_epsilon=1e-8, no_fused_adam=args.no_fused_adam)
        self.optimizer = adamw(self.params, ns, device)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.batch = synthetic_batch(args.batch_size, args.resolution, device, args.seed)
        self.loss, self.weights = train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS
        scale = vae_scale_factor(parts.vae)
        self.latent_shape = (args.batch_size, args.num_timesteps, parts.model.student.config.in_channels,
                             args.resolution // scale, args.resolution // scale)
        self.generator = torch.Generator(device=device).manual_seed(args.seed)

    def checkpointing(self, on: bool) -> None:
        student, vae, heads = self.parts.model.student, self.parts.vae, self.parts.model.heads
        if on:
            student.enable_gradient_checkpointing()
            heads.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        elif student.is_gradient_checkpointing or vae.is_gradient_checkpointing:
            student.disable_gradient_checkpointing()
            heads.disable_gradient_checkpointing()
            vae.disable_gradient_checkpointing()

    def forward_backward(self, step_fn) -> None:
        from d3.objective import Objective
        from d3.timesteps import stratified_timesteps

        p, b = self.parts, self.args.batch_size
        t = stratified_timesteps(b, self.args.num_timesteps, generator=self.generator, device=self.device)
        noise = torch.randn(self.latent_shape, generator=self.generator, device=self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = step_fn(p.model, p.experts(), p.vae, p.prompt_embeds, Objective(self.loss, self.weights), self.batch,
                          t, noise)
        out.loss.backward()

    def step(self, step_fn, clock: dict[str, float] | None = None) -> None:
        """One optimizer step; `clock` accumulates the seconds of its two parts: "compute" (forward and backward,
        what the FLOP count covers) and "update" (gradient clipping and AdamW: the same work on both sides)."""
        start = time.perf_counter()
        self.forward_backward(step_fn)
        synchronize(self.device)
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        if clock is not None:
            clock["compute"] += middle - start
            clock["update"] += time.perf_counter() - middle

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.parts.teacher_capture._store.clear()
        self.parts.model.capture._store.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    from d3.objective import d3_step
    from d3.training_setup import apply_speed_flags, set_tf32
    from d3.reference_step import per_copy_step

    args = parse_args(argv)
    args.resolution = args.resolution or default_resolution(args.backbone)
    set_threads(args.num_threads)
    device = pick_device(args.device)
    set_tf32(args.allow_tf32)
    bench = Bench(args, device)
    sides = {"ours": d3_step}
    if not args.skip_reference:
        sides["reference"] = per_copy_step
    checkpointing = {"ours": args.gradient_checkpointing, "reference": args.reference_gradient_checkpointing}
    status: dict[str, str] = {}

    baseline = memory_baseline(device)  # after loading, before any step (the optimizer state counts)
    flops: dict[str, float] = {}
    if not args.no_flops:  # eager, before compilation: the counter sees every matmul, convolution and attention
        for side, fn in sides.items():
            bench.checkpointing(checkpointing[side])
            try:
                flops[side] = count_flops(lambda fn=fn: bench.forward_backward(fn)) / args.batch_size
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                status[side] = "OOM"
            bench.release()
    if args.compile:
        apply_speed_flags(bench.parts.model, bench.parts.teacher, bench.parts.vae, compile=True,
                          compile_backend=args.compile_backend)

    meters = {side: PeakMemory(device, baseline) for side in sides}
    clocks = {side: {"compute": 0.0, "update": 0.0} for side in sides}

    def guarded(side: str, body) -> None:
        if status.get(side):
            return
        bench.checkpointing(checkpointing[side])
        try:
            body()
        except RuntimeError as err:
            if not is_oom(err):
                raise
            status[side] = "OOM"
        bench.release()

    order = list(reversed(sides))  # the reference first: on the CPU its leftovers can only inflate our figure
    for side in order:
        guarded(side, lambda side=side: [bench.step(sides[side]) for _ in range(args.warmup)])
    for _ in range(args.rounds):
        for side in order:
            def measure(side=side):
                with meters[side]:
                    for _ in range(args.iterations):
                        bench.step(sides[side], clocks[side])
            guarded(side, measure)
    seconds = {side: sum(clock.values()) for side, clock in clocks.items()}

    images = args.batch_size * args.iterations * args.rounds
    labels = {"ours": "ours (d3_step)", "reference": "official-style reference"}
    rows = []
    for side in sides:
        oom = status.get(side) == "OOM"
        note = "out of memory" if oom else ("grad. checkpointing" if checkpointing[side] else "")
        rows.append(Row(labels[side], None if oom else seconds[side], images,
                        None if oom else meters[side].peak, note))
    ratios, result = {}, {r.side: {"ms_per_image": r.ms_per_image, "images_per_s": r.images_per_s,
                                   "peak_memory_bytes": r.peak_bytes} for r in rows}
    if len(rows) == 2 and all(r.seconds for r in rows):
        speedup = rows[0].images_per_s / rows[1].images_per_s
        memory = rows[0].peak_bytes / rows[1].peak_bytes if rows[1].peak_bytes else float("nan")
        ratios["speed-up (images/s, ours / reference)"] = f"{speedup:.2f}x"
        ratios["peak memory (ours / reference)"] = f"{memory:.2f}x"
        result.update(speedup=speedup, memory_ratio=memory)
    elif len(rows) == 2 and rows[1].seconds is None:
        ratios["speed-up"] = "the reference does not fit in memory at this micro-batch; ours does" if rows[0].seconds \
            else "neither side fits in memory"
    extra = []
    peak = peak_tflops(device, args.peak_tflops)
    for side, f in flops.items():
        line = f"counted FLOPs per image, {labels[side]}: {f / 1e12:.3g} TFLOP"
        if peak:
            line += f" -> {1000 * f / (peak * 1e12):.1f} ms/image at {peak:g} TFLOP/s (physical limit)"
            r = next(r for r in rows if r.side == labels[side])
            if r.seconds:
                line += f"; achieved {f / 1e12 * r.images_per_s / peak:.0%} of peak"
        extra.append(line)
    steps = args.iterations * args.rounds
    for side in sides:
        if not status.get(side):
            extra.append(f"{labels[side]}: {1000 * clocks[side]['compute'] / steps:.0f} ms forward and backward, "
                         f"{1000 * clocks[side]['update'] / steps:.0f} ms update (clip + "
                         f"{'fused' if bench.fused else 'foreach'} AdamW) per step")
    measured = {side: c["compute"] for side, c in clocks.items() if not status.get(side)}
    if len(measured) == 2:
        result["speedup_forward_backward"] = measured["reference"] / measured["ours"]
        extra.append(f"speed-up on forward and backward alone (what the FLOPs count): "
                     f"{result['speedup_forward_backward']:.2f}x")
    if len(flops) == 2:
        flop_ratio = result["flop_ratio"] = flops["reference"] / flops["ours"]
        extra.append(f"FLOP ratio (reference / ours): {flop_ratio:.2f}x")
        for key, what in (("speedup", "the speed-up"), ("speedup_forward_backward", "forward and backward alone")):
            if key in result:
                extra.append(f"{what} reaches {result[key] / flop_ratio:.0%} of the FLOP ratio (goal: >= 90%)")
    result["tflop_per_image"] = {side: f / 1e12 for side, f in flops.items()}
    on_target = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and args.resolution == 768 \
        and (args.backbone == "sd21" or bool(args.backbone_dir))
    extra += goal_lines(on_target, [
        ("speed-up vs the reference", result.get("speedup"), ">=", 2.3),
        ("peak memory vs the reference", result.get("memory_ratio"), "<=", 0.6),
        ("images/s, ours", rows[0].images_per_s, ">=", 12.0)])
    device_text = describe_device(device)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[bench.dtype]
    setting = {
        "backbone": args.backbone_dir or args.backbone,
        "precision": dtype_name + ("" if bench.dtype == torch.float32 else " autocast, fp32 master weights"),
        "resolution": args.resolution,
        "batch size": args.batch_size,
        "expert timesteps": args.num_timesteps,
        "flags": ", ".join(f for f, on in [("channels_last", args.channels_last), ("compile", args.compile),
                                           ("tf32", args.allow_tf32), ("fused AdamW", bench.fused)] if on) or "none",
        "attention": attention_kind(bench.parts.model.student),
        "timed": f"{args.rounds} rounds x {args.iterations} steps per side after {args.warmup} warm-up steps",
    }
    print_table("training step", device_text, setting, rows, ratios, meters["ours"].label, extra)
    result.update(device=device_text, setting={k: str(v) for k, v in setting.items()}, status=status)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
