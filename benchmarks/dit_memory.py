"""Memory of D³ training per option (weights, gradients, optimizer states), computed from the real model configs.

    python benchmarks/dit_memory.py                                   # FLUX.1-dev; FSDP on 8 GPUs; LoRA 16, 64, 128
    python benchmarks/dit_memory.py --backbone sd3-medium --json /tmp/sd3-memory.json
    python benchmarks/dit_memory.py --backbone sd21 --num_gpus 4 --lora_rank 32

Nothing is downloaded and no GPU is used: the denoiser, the VAE and the projection heads of the default layer set
are instantiated on the meta device from their configs (FLUX.1-dev: diffusers' `FluxTransformer2DModel` defaults
with the guidance embedding; SD3-medium: its published transformer config; SD 2.1: `d3.tiny`'s "sd21" preset), and
every figure is bytes per parameter times exact parameter counts. GB means 1e9 bytes.

Per GPU, bf16 mixed precision (the precision d3's training stores frozen modules in):
- full fine-tuning, AdamW: student fp32 weights 4 B/param + fp32 gradients 4 + AdamW's two fp32 states 8; the frozen
  teacher is a bf16 copy (2 B/param); VAE bf16; heads and the learned student timestep trained like the student;
- full fine-tuning, 8-bit AdamW (`--use_8bit_adam`, bitsandbytes' AdamW8bit): states of 1 + 1 byte per element
  plus one fp32 absmax per state and 256-element block, for tensors of at least 4096 elements (bitsandbytes'
  `min_8bit_size`); smaller tensors keep fp32 states (8 B);
- full fine-tuning under FSDP FULL_SHARD over N GPUs (`configs/fsdp_flux.yaml`): the trained model's parameters,
  gradients and states are divided by N; the teacher, the VAE and all buffers stay whole on every GPU (accelerate
  does not prepare them);
- LoRA of rank r on the student (`--lora_rank r`): the frozen base in bf16 (2 B/param) is the student's and the
  teacher's network at once (`Denoiser.without_adapters`); the adapters are fp32 and trained with AdamW (16 B/param)
  or 8-bit AdamW, as the heads. Adapters are counted exactly: every nn.Linear whose qualified name equals one of the
  denoiser's `lora_targets` or ends with "." + a target (peft's rule) gets r·(in + out) parameters.

Not counted: activations (resolution, batch size and gradient checkpointing decide them; they come on top), the
text encoders (released after the fixed prompt is encoded), the CUDA context and the allocator's cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

GB = 1e9  # bytes; decimal, as the table says
FSDP_CONFIG = ROOT / "configs" / "fsdp_flux.yaml"

# bitsandbytes' AdamW8bit (what `d3.training_setup.make_optimizer` builds with --use_8bit_adam, default arguments)
BNB_MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep fp32 states
BNB_BLOCKSIZE = 256  # elements per fp32 absmax of the block-wise quantisation (current releases; 2048 in old ones)

# A "FLUX.1"/"SD3" VAE: SD 2.1's AutoencoderKL (d3/tiny.py's sd21 preset) with 16 latent channels and no quant convs
# (both models' published config; sample size and scaling factors do not change the parameter count).
DIT_VAE_OVERRIDES = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
# stabilityai/stable-diffusion-3-medium's transformer/config.json (every argument is accepted by diffusers 0.42).
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
BACKBONES = ("flux-dev", "sd3-medium", "sd21")
# Blocks wrapped as FSDP units: Flux's from configs/fsdp_flux.yaml (read there), the analogous classes otherwise.
FSDP_WRAP = {"sd3-medium": ("JointTransformerBlock",), "sd21": ("BasicTransformerBlock", "ResnetBlock2D")}


# ------------------------------------------------------------------------------------------------ counting
@dataclass
class Part:
    """A module's parameter tensors (their element counts) and its floating-point buffer elements."""

    name: str
    tensors: list[int]
    buffers: int = 0

    @property
    def params(self) -> int:
        return sum(self.tensors)


@dataclass
class Counts:
    backbone: str
    student: Part  # the denoiser (UNet / transformer)
    heads: Part  # the projection heads of the layer set, plus the learned student timestep (one parameter)
    vae: Part
    lora: dict[int, Part] = field(default_factory=dict)  # rank -> the adapter tensors (A: r x in, B: out x r)
    layers: int = 0  # aligned layers (heads)
    fsdp_wrap: tuple[str, ...] = ()
    fsdp_units: list[int] = field(default_factory=list)  # parameters of each wrapped block


def part_of(module: nn.Module, name: str) -> Part:
    return Part(name, [p.numel() for p in module.parameters()],
                sum(b.numel() for b in module.buffers() if b.is_floating_point()))


def lora_targeted(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """The modules peft wraps for `target_modules=targets` (a list): name equal to a target or ending in "."+target."""
    targets = list(targets)
    found = [(name, m) for name, m in model.named_modules()
             if name in targets or any(name.endswith("." + t) for t in targets)]
    unsupported = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    if unsupported:
        raise ValueError(f"LoRA targets match modules that are not nn.Linear (not counted here): {unsupported[:4]}")
    return found


def lora_tensors(model: nn.Module, targets, rank: int) -> list[int]:
    """Element counts of the adapter tensors: lora_A (r x in) and lora_B (out x r) for each targeted Linear."""
    out = []
    for _, linear in lora_targeted(model, targets):
        out += [rank * linear.in_features, linear.out_features * rank]
    return out


def lora_count(model: nn.Module, targets, rank: int) -> int:
    return sum(lora_tensors(model, targets, rank))


def fsdp_units(model: nn.Module, classes) -> list[int]:
    """Parameters of each module FSDP's TRANSFORMER_BASED_WRAP makes a unit of (outermost matches)."""
    units, inside = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(p + ".") for p in inside):
            inside.append(name)
            units.append(sum(p.numel() for p in module.parameters()))
    return units


def fsdp_settings(path: Path = FSDP_CONFIG) -> dict:
    """num_processes, sharding strategy and wrapped classes of the accelerate FSDP config."""
    import yaml

    config = yaml.safe_load(path.read_text())
    fsdp = config["fsdp_config"]
    return {"num_processes": int(config["num_processes"]),
            "sharding_strategy": fsdp["fsdp_sharding_strategy"],
            "wrap": tuple(c.strip() for c in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))}


def meta_backbone(backbone: str):
    """(denoiser, vae) of a backbone, weightless on the meta device."""
    import diffusers

    from d3.denoisers import FluxDenoiser, SD3Denoiser, UNetDenoiser
    from d3.tiny import PRESETS, unet_config

    with torch.device("meta"):
        if backbone == "flux-dev":
            denoiser = FluxDenoiser(diffusers.FluxTransformer2DModel(guidance_embeds=True))
            vae = diffusers.AutoencoderKL(**{**PRESETS["sd21"]["vae"], **DIT_VAE_OVERRIDES})
        elif backbone == "sd3-medium":
            denoiser = SD3Denoiser(diffusers.SD3Transformer2DModel(**SD3_MEDIUM))
            vae = diffusers.AutoencoderKL(**{**PRESETS["sd21"]["vae"], **DIT_VAE_OVERRIDES})
        elif backbone == "sd21":
            denoiser = UNetDenoiser(diffusers.UNet2DConditionModel(**unet_config("sd21")))
            vae = diffusers.AutoencoderKL(**PRESETS["sd21"]["vae"])
        else:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    return denoiser, vae


def count(backbone: str, ranks=(64,), layer_set: str | None = None, head_type: str = "cleandift") -> Counts:
    from d3.heads import ProjectionHeads

    denoiser, vae = meta_backbone(backbone)
    layers = denoiser.layer_set(layer_set)
    with torch.device("meta"):
        heads = ProjectionHeads(denoiser.feature_channels(layers), head_type)
    head_part = part_of(heads, "heads")
    head_part.tensors.append(1)  # D3Model.student_timestep, trained with the heads
    wrap = fsdp_settings()["wrap"] if backbone == "flux-dev" else FSDP_WRAP[backbone]
    return Counts(
        backbone=backbone,
        student=part_of(denoiser.model, denoiser.model_class_name),
        heads=head_part,
        vae=part_of(vae, "vae"),
        lora={r: Part(f"lora r={r}", lora_tensors(denoiser.model, denoiser.lora_targets, r)) for r in ranks},
        layers=len(layers),
        fsdp_wrap=wrap,
        fsdp_units=fsdp_units(denoiser.model, wrap),
    )


# ---------------------------------------------------------------------------------------------- the bytes
def adamw8bit_state_bytes(tensors: list[int]) -> int:
    """bitsandbytes AdamW8bit: two uint8 states + two fp32 absmax per block, or two fp32 states for small tensors."""
    total = 0
    for n in tensors:
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCKSIZE)
    return total


def _row(key: str, option: str, trainable: int, heads: int, weights: float, grads: float, states: float,
         frozen: float) -> dict:
    parts = {"trained_weights": weights, "grads": grads, "optimizer_states": states, "frozen_weights": frozen}
    parts["total"] = weights + grads + states + frozen
    return {"key": key, "option": option, "trainable_params": trainable + heads, "trainable_student": trainable,
            "trainable_heads": heads, "bytes": parts}


def memory_rows(c: Counts, num_gpus: int = 8, ranks=(64,)) -> list[dict]:
    """Bytes per GPU of each training option (weights + gradients + optimizer states; no activations)."""
    s, h, v = c.student, c.heads, c.vae
    trained = s.params + h.params  # everything the optimizer holds in full fine-tuning
    vae = 2 * (v.params + v.buffers)  # bf16
    teacher = 2 * (s.params + s.buffers)  # bf16 copy (full fine-tuning) or the shared frozen base (LoRA)
    rows = [
        _row("full-adamw", "full fine-tuning, AdamW", s.params, h.params,
             4 * (trained + s.buffers + h.buffers), 4 * trained, 8 * trained, teacher + vae),
        _row("full-adamw8bit", "full fine-tuning, 8-bit AdamW", s.params, h.params,
             4 * (trained + s.buffers + h.buffers), 4 * trained, adamw8bit_state_bytes(s.tensors + h.tensors),
             teacher + vae),
        _row(f"fsdp{num_gpus}-adamw", f"full fine-tuning, AdamW, FSDP FULL_SHARD / {num_gpus} GPUs",
             s.params, h.params,
             4 * trained / num_gpus + 4 * (s.buffers + h.buffers), 4 * trained / num_gpus, 8 * trained / num_gpus,
             teacher + vae),
    ]
    for r in ranks:
        lora = c.lora[r]
        n = lora.params + h.params
        weights = 4 * (n + h.buffers)
        rows.append(_row(f"lora{r}-adamw", f"LoRA r={r}, AdamW", lora.params, h.params, weights, 4 * n, 8 * n,
                         teacher + vae))
        rows.append(_row(f"lora{r}-adamw8bit", f"LoRA r={r}, 8-bit AdamW", lora.params, h.params, weights, 4 * n,
                         adamw8bit_state_bytes(lora.tensors + h.tensors), teacher + vae))
    return rows


def verdict(total_bytes: float, gpu_gb: float, headroom_gb: float) -> str:
    left = gpu_gb - total_bytes / GB
    if left >= headroom_gb:
        return f"yes ({left:.1f} GB left)"
    if left >= 0:
        return f"tight ({left:.1f} GB left)"
    return f"no ({-left:.1f} GB over)"


# ------------------------------------------------------------------------------------------------- output
def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table(rows: list[dict], gpu_gb: float, headroom_gb: float) -> str:
    head = ("| option | trained params (student or LoRA + heads) | trained weights | gradients | optimizer states "
            f"| frozen weights | total | fits {gpu_gb:g} GB with ≥ {headroom_gb:g} GB left |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        b = row["bytes"]
        cells = [row["option"], f"{_params(row['trainable_student'])} + {_params(row['trainable_heads'])}"]
        cells += [f"{b[k] / GB:.2f}" for k in ("trained_weights", "grads", "optimizer_states", "frozen_weights",
                                               "total")]
        cells.append(row["fits"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(c: Counts, gpu_gb: float, headroom_gb: float) -> list[str]:
    s, h, v = c.student, c.heads, c.vae
    units = c.fsdp_units
    root = s.params - sum(units)
    lines = [
        f"GB = 1e9 bytes, per GPU, bf16 mixed precision. Parameters: {c.student.name} {s.params:,} "
        f"(+{s.buffers:,} buffer elements); projection heads of {c.layers} layers + student timestep "
        f"{h.params:,}; VAE {v.params:,}.",
        "trained weights: fp32 student (full fine-tuning) or fp32 LoRA adapters, plus the fp32 heads; frozen weights: "
        "bf16 teacher copy (full fine-tuning) or the bf16 base shared by student and teacher (LoRA), plus the bf16 "
        "VAE.",
        "Activations are NOT included: they come on top and depend on resolution, batch size, N_T and gradient "
        "checkpointing (--gradient_checkpointing changes only them). They were not measured: this script runs "
        "without a GPU.",
        "Full fine-tuning under bf16 autocast also casts the fp32 student's weights to bf16 where they are used; "
        f"without FSDP those casts (up to 2 B/param, {2 * s.params / GB:.1f} GB here) live with the activations and "
        "are not counted.",
        f"'fits': total <= {gpu_gb:g} GB - {headroom_gb:g} GB of headroom (--headroom_gb, an assumed allowance for "
        f"activations, CUDA context and allocator cache, not a measurement); {gpu_gb:g} GB is taken as "
        f"{gpu_gb:g}e9 bytes (an '80 GB' card's 80 GiB are 85.9e9).",
        f"8-bit AdamW: bitsandbytes AdamW8bit, 2 B/element + fp32 absmax per {BNB_BLOCKSIZE}-element block for "
        f"tensors >= {BNB_MIN_8BIT_SIZE} elements, fp32 states (8 B) below.",
    ]
    if units:
        lines.append(
            f"FSDP ({', '.join(c.fsdp_wrap)} wrapped, {len(units)} units): each unit's bf16 weights are all-gathered "
            f"whole while it computes: largest unit {_params(max(units))} = {2 * max(units) / GB:.2f} GB; the root "
            f"unit (the rest of the student, {_params(root)}, and the projection heads, {_params(h.params)}) = "
            f"{2 * (root + h.params) / GB:.2f} GB gathered. Transient, not in the table.")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="flux-dev")
    p.add_argument("--num_gpus", type=int, default=None,
                   help=f"GPUs of the FSDP row (default: num_processes of {FSDP_CONFIG.relative_to(ROOT)})")
    p.add_argument("--lora_rank", type=int, nargs="+", default=[16, 64, 128], help="LoRA ranks, one row pair each")
    p.add_argument("--layer_set", default=None, help="aligned layers, as the training flag (default: the backbone's)")
    p.add_argument("--head_type", default="cleandift", choices=["cleandift", "linear", "none"])
    p.add_argument("--gpu_gb", type=float, default=80.0, help="GPU memory in GB (1e9 bytes)")
    p.add_argument("--headroom_gb", type=float, default=10.0,
                   help="memory to leave for activations etc. for a row to count as fitting (assumed)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if any(r <= 0 for r in args.lora_rank):
        p.error("--lora_rank: ranks must be positive")
    if args.num_gpus is not None and args.num_gpus <= 0:
        p.error("--num_gpus must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    settings = fsdp_settings()
    num_gpus = args.num_gpus or settings["num_processes"]
    ranks = sorted(set(args.lora_rank))
    counts = count(args.backbone, ranks, args.layer_set, args.head_type)
    rows = memory_rows(counts, num_gpus, ranks)
    for row in rows:
        row["gb"] = {k: round(b / GB, 3) for k, b in row["bytes"].items()}
        row["fits"] = verdict(row["bytes"]["total"], args.gpu_gb, args.headroom_gb)
        row["fits_with_headroom"] = row["bytes"]["total"] <= (args.gpu_gb - args.headroom_gb) * GB
    text_notes = notes(counts, args.gpu_gb, args.headroom_gb)
    if settings["sharding_strategy"] != "FULL_SHARD":
        text_notes.append(f"{FSDP_CONFIG.name} now says {settings['sharding_strategy']}; the FSDP row assumes "
                          "FULL_SHARD (parameters, gradients and states all sharded).")
    print(f"## D³ training memory, {args.backbone}: weights + gradients + optimizer states per GPU (GB = 1e9 bytes)\n")
    print(table(rows, args.gpu_gb, args.headroom_gb))
    print()
    for line in text_notes:
        print(f"- {line}")
    result = {
        "backbone": args.backbone,
        "unit": "GB = 1e9 bytes, per GPU",
        "precision": "bf16 mixed precision",
        "gpu_gb": args.gpu_gb,
        "headroom_gb": args.headroom_gb,
        "num_gpus": num_gpus,
        "fsdp_sharding_strategy": settings["sharding_strategy"],
        "lora_ranks": ranks,
        "layers": counts.layers,
        "head_type": args.head_type,
        "params": {"student": counts.student.params, "student_buffers": counts.student.buffers,
                   "heads": counts.heads.params, "vae": counts.vae.params,
                   "lora": {str(r): counts.lora[r].params for r in ranks},
                   "fsdp_largest_unit": max(counts.fsdp_units, default=0)},
        "activations": "not included (not measured: no GPU used)",
        "rows": rows,
        "notes": text_notes,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
