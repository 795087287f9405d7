"""The projection heads alone at a backbone's size: peak memory and time of forward + backward, with and without
head checkpointing (what `--gradient_checkpointing` does to them).

    python benchmarks/heads_step.py                       # FLUX.1-dev at 768²: 25 heads of width 3072, 2304 tokens
    python benchmarks/heads_step.py --layers 2 --width 32 --tokens 16 --device cpu     # seconds, any machine

The heads are fp32 (trained), the student features and the teacher's expert features bf16, under bf16 autocast
on CUDA (fp32 on the CPU unless --precision bf16), as in training. Peak memory is the CUDA allocator's peak above
what was allocated before the step (weights and inputs), so it is the step's activations and gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def run(args: argparse.Namespace, checkpointing: bool, heads, student, expert, t, device) -> dict:
    from d3.objective import alignment_loss

    heads.gradient_checkpointing = checkpointing
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    result = {}
    for i in range(2):  # the first step warms the allocator and the kernels up; the second is reported
        heads.zero_grad(set_to_none=True)
        for v in student.values():
            v.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = alignment_loss(heads, student, expert, t)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        result["seconds"] = time.perf_counter() - start
        result["loss"] = float(loss.detach())
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=25, help="aligned layers (FLUX.1-dev: the last 25 single blocks)")
    p.add_argument("--width", type=int, default=3072, help="channels per layer")
    p.add_argument("--tokens", type=int, default=2304, help="image tokens per layer (768² FLUX: 48 x 48)")
    p.add_argument("--timesteps", type=int, default=3, help="expert timesteps N_T")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    from d3.heads import ProjectionHeads

    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens:
        p.error("--tokens must be a square (a grid of side x side)")
    torch.manual_seed(0)
    layers = [f"single_transformer_blocks.{i}" for i in range(args.layers)]
    heads = ProjectionHeads({name: args.width for name in layers}).to(device)
    feat_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    b, n = args.batch_size, args.timesteps
    student = {name: torch.randn(b, args.width, side, side, device=device, dtype=feat_dtype, requires_grad=True)
               for name in layers}
    expert = {name: torch.randn(b * n, args.width, side, side, device=device, dtype=feat_dtype) for name in layers}
    t = torch.rand(b, n, device=device) * 999
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "setting": {k: v for k, v in vars(args).items() if k != "json"},
              "head_params": sum(p.numel() for p in heads.parameters())}
    for name, on in (("plain", False), ("checkpointed", True)):
        result[name] = run(args, on, heads, student, expert, t, device)
        peak = result[name].get("peak_bytes")
        print(f"heads, {name}: {result[name]['seconds'] * 1000:.0f} ms forward+backward"
              + (f", peak {peak / 1e9:.2f} GB above weights and inputs" if peak is not None else ""), flush=True)
    if abs(result["plain"]["loss"] - result["checkpointed"]["loss"]) > 1e-3 * max(1.0, abs(result["plain"]["loss"])):
        raise SystemExit(f"head checkpointing changed the loss: {result['plain']['loss']} vs "
                         f"{result['checkpointed']['loss']}")
    print(f"{result['head_params'] / 1e9:.2f}B head parameters; {args.layers} layers x {args.width} channels x "
          f"{args.tokens} tokens x {n} timesteps x batch {b}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
