"""Training memory per GPU with activations, per part and option, measured on the CPU and scaled (issue 19).

    python benchmarks/activation_memory.py                       # SD 2.1 and FLUX.1-dev shapes, ~10 min of CPU
    python benchmarks/activation_memory.py --backbones tiny tiny-flux --sizes 32 64 --resolutions 64   # CI size
    python benchmarks/activation_memory.py --backbones sd21 --json sd21.json      # one backbone per process (RAM),
    python benchmarks/activation_memory.py --backbones flux-dev --json flux.json  # then the table of both:
    python benchmarks/activation_memory.py --coefficients sd21.json flux.json

What is measured. Every part runs forward once under CPU bf16 autocast on random weights of the real shapes, and
the bytes it keeps for the backward pass are counted: the distinct storages autograd saves (saved_tensors_hooks)
plus the inputs that checkpointed segments keep for their recomputation (each segment is run through this script's
checkpoint function, which also records the bytes the largest segment saves when it is recomputed in backward:
the "recompute peak"). Parameters and buffers are not counted. CUDA autocast runs group_norm and layer_norm in fp32
where CPU autocast keeps bf16; `--cuda_policy` (on by default) runs them in fp32 as CUDA would.

How it is scaled. Each part is measured at (B=1, s1), (B=1, s2) and (B=2, s1) (s = image side, `--sizes`), and
its bytes are fitted exactly as  W + B·(a + b·pixels):  W is what does not grow with the batch (under autocast, the
bf16 copies of fp32 weights), a the per-image constant (e.g. the text tokens), b the per-pixel slope (latent pixels
and tokens are proportional to image pixels; attention is the flash kernel on the CPU as on a GPU, so linear).
- student: the SD 2.1 UNet whole; FLUX.1-dev as a 1 double + 1 single block model of the real width, each block
  measured on its own and multiplied by the real count (19 + 38), the rest once;
- heads: one head + cosine per distinct (width, tokens per pixel), times the layers of the default layer set,
  at N_T = 3 expert timesteps; with head checkpointing nothing is kept and the largest layer is the recompute peak;
- teacher: runs without gradient; what it leaves is the expert features, kept until the loss: B·N_T·tokens·C bf16;
- VAE decoder: bf16 weights (frozen), gradient to its input (the student's prediction).
Static memory (weights, gradients, optimizer states) comes from benchmarks/dit_memory.py's exact parameter counts.
GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from benchmarks import dit_memory  # noqa: E402

GB = 1e9
N_T = 3
H100_BYTES = 84.9e9  # torch's total_memory of an "80 GB" H100 (OOM messages say "total capacity of 79.1x GiB")
OVERHEAD = 1.5e9  # CUDA context, cuBLAS/NCCL workspaces: outside PyTorch's allocator (assumed, not measured)
FLUX_DOUBLE, FLUX_SINGLE = 19, 38
MEASURED = ("student", "heads", "vae")


# ------------------------------------------------------------------------------------------------ measuring
class Retained:
    """Bytes a forward keeps for backward, by label (the block that made them); see the module docstring."""

    def __init__(self, *modules: torch.nn.Module):
        self.skip = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.storages: dict[int, tuple[int, str]] = {}
        self.label = "rest"
        self.labels: dict[int, str] = {}  # id(module) -> label, for checkpointed blocks
        self.recompute_peak = 0

    def add(self, t, label: str | None = None) -> None:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.skip and ptr not in self.storages:
                self.storages[ptr] = (storage.nbytes(), label or self.label)

    def pack(self, t):
        self.add(t)
        return t

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for nbytes, label in self.storages.values():
            out[label] = out.get(label, 0) + nbytes
        return out

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def checkpoint(self, fn, *args):
        """diffusers' `gradient_checkpointing_func(module, *args)`: non-reentrant checkpoint, measured."""
        label = self.labels.get(id(fn), self.label)
        for a in args:
            self.add(a, label)
        inner = Retained()
        inner.skip = self.skip
        with inner.hooks():  # the segment as backward recomputes it (its output is dropped)
            fn(*args)
        self.recompute_peak = max(self.recompute_peak, sum(n for n, _ in inner.storages.values()))
        return checkpoint(fn, *args, use_reentrant=False)


@contextlib.contextmanager
def cuda_autocast_policy(on: bool = True):
    """group_norm and layer_norm in fp32 (fp32 out), as CUDA autocast runs them; CPU autocast keeps bf16."""
    if not on:
        yield
        return
    group_norm, layer_norm = F.group_norm, F.layer_norm

    def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
        f = (lambda t: None if t is None else t.float())
        return group_norm(x.float(), num_groups, f(weight), f(bias), eps)

    def ln(x, shape, weight=None, bias=None, eps=1e-5):
        f = (lambda t: None if t is None else t.float())
        return layer_norm(x.float(), shape, f(weight), f(bias), eps)

    F.group_norm, F.layer_norm = gn, ln
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = group_norm, layer_norm


def fit(points: dict[tuple[int, int], float]) -> dict[str, float]:
    """W + B·(a + b·pixels) through (1, s1), (1, s2), (2, s1)."""
    (b1, s1), (_, s2), _ = sorted(points, key=lambda k: (k[0], k[1]))
    one1, one2, two1 = points[(1, s1)], points[(1, s2)], points[(2, s1)]
    slope = (one2 - one1) / (s2 * s2 - s1 * s1)
    per_image = two1 - one1
    a = per_image - slope * s1 * s1
    return {"W": one1 - per_image, "a": a, "b": slope}


def at(f: dict[str, float], batch: int, side: int) -> float:
    return f["W"] + batch * (f["a"] + f["b"] * side * side)


def _forward(meter: Retained, run, cuda_policy: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast_policy(cuda_policy), meter.hooks():
        return run()


def _label_hooks(meter: Retained, blocks: dict[str, torch.nn.Module]):
    handles = []
    for label, module in blocks.items():
        meter.labels[id(module)] = label
        prev = []

        def pre(_m, _a, label=label, prev=prev):
            prev.append(meter.label)
            meter.label = label

        def post(_m, _a, _o, prev=prev):
            meter.label = prev.pop()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


# ----------------------------------------------------------------------------------------------- the parts
def build(backbone: str):
    """(denoiser, vae, condition, vae latent factor) of random weights; FLUX.1-dev at 1 + 1 blocks."""
    import diffusers

    from d3.denoisers import FluxDenoiser, UNetDenoiser
    from d3.tiny import DIT_PRESETS, PRESETS, unet_config

    torch.manual_seed(0)
    if backbone in ("sd21", "tiny"):
        denoiser = UNetDenoiser(diffusers.UNet2DConditionModel(**unet_config(backbone)))
        vae = diffusers.AutoencoderKL(**PRESETS[backbone]["vae"])
        cond = torch.randn(1, 77, denoiser.config.cross_attention_dim)
    else:
        if backbone == "flux-dev":
            model = diffusers.FluxTransformer2DModel(guidance_embeds=True, num_layers=1, num_single_layers=1)
            vae = diffusers.AutoencoderKL(**{**PRESETS["sd21"]["vae"], **dit_memory.DIT_VAE_OVERRIDES})
            text = 512  # d3.backbone's T5 sequence
        else:  # tiny-flux
            model = diffusers.FluxTransformer2DModel(**DIT_PRESETS["tiny-flux"]["transformer"])
            vae = diffusers.AutoencoderKL(**DIT_PRESETS["tiny-flux"]["vae"])
            text = DIT_PRESETS["tiny-flux"]["t5_max_length"]
        denoiser = FluxDenoiser(model)
        c = model.config
        cond = {"encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim),
                "pooled_projections": torch.randn(1, c.pooled_projection_dim)}
    return denoiser, vae.requires_grad_(False).to(torch.bfloat16), cond


def _blocks(denoiser) -> dict[str, torch.nn.Module]:
    m = denoiser.model
    if hasattr(m, "single_transformer_blocks"):
        return {"double": m.transformer_blocks[0], "single": m.single_transformer_blocks[0]}
    return {}


def measure_student(denoiser, cond, scale: int, sizes, checkpointed: bool, cuda_policy: bool):
    """{label: fit} of the student's retained bytes (+ "recompute peak"), and the hooked layers' shapes per pixel."""
    model = denoiser.model
    layers = denoiser.layer_set(None)
    capture = denoiser.feature_capture(layers)
    points: dict[str, dict] = {}
    shapes = {}
    for batch, side in ((1, sizes[0]), (1, sizes[1]), (2, sizes[0])):
        meter = Retained(model)
        if checkpointed:
            model.enable_gradient_checkpointing(meter.checkpoint)
        handles = _label_hooks(meter, _blocks(denoiser))
        latents = torch.randn(batch, denoiser.latent_channels, side // scale, side // scale)
        out = _forward(meter, lambda: denoiser(latents, torch.tensor(261.0), cond), cuda_policy)
        for h in handles:
            h.remove()
        feats = capture.pop()
        if batch == 1:
            shapes = {k: (v.shape[1], v.shape[2] * v.shape[3] / side**2) for k, v in feats.items()}
        for label, nbytes in {**meter.by_label(), "recompute peak": meter.recompute_peak}.items():
            points.setdefault(label, {})[(batch, side)] = nbytes
        del out, feats
    capture.remove()
    if checkpointed:
        model.disable_gradient_checkpointing()
    return {k: fit(v) for k, v in points.items() if len(v) == 3}, shapes


def measure_vae(vae, scale: int, sizes, checkpointed: bool, cuda_policy: bool):
    from d3.latents import decode_latent

    points: dict[str, dict] = {}
    for batch, side in ((1, sizes[0]), (1, sizes[1]), (2, sizes[0])):
        meter = Retained(vae)
        if checkpointed:
            vae.enable_gradient_checkpointing(meter.checkpoint)
        z = torch.randn(batch, vae.config.latent_channels, side // scale, side // scale, requires_grad=True)
        out = _forward(meter, lambda: decode_latent(vae, z), cuda_policy)
        for label, nbytes in {"vae": sum(meter.by_label().values()), "recompute peak": meter.recompute_peak}.items():
            points.setdefault(label, {})[(batch, side)] = nbytes
        del out
    if checkpointed:
        vae.disable_gradient_checkpointing()
    return {k: fit(v) for k, v in points.items()}


def measure_head(width: int, tokens: tuple[int, int], cuda_policy: bool) -> dict[str, float]:
    """One layer's head + cosine at N_T timesteps: {"W": weight casts, "k": bytes per token per timestep}."""
    from d3.heads import ProjectionHeads
    from d3.objective import alignment_loss

    heads = ProjectionHeads({"l": width})
    got = {}
    for side in tokens:
        feat = torch.randn(1, width, side, side, dtype=torch.bfloat16, requires_grad=True)
        expert = {"l": torch.randn(N_T, width, side, side, dtype=torch.bfloat16)}
        t = torch.rand(1, N_T) * 999
        meter = Retained(heads)
        meter.skip |= {feat.untyped_storage().data_ptr(), expert["l"].untyped_storage().data_ptr()}  # alive anyway
        _forward(meter, lambda: alignment_loss(heads, {"l": feat}, expert, t), cuda_policy)
        got[side * side] = sum(n for n, _ in meter.storages.values())
    (l1, m1), (l2, m2) = sorted(got.items())
    k = (m2 - m1) / (N_T * (l2 - l1))
    return {"W": m1 - k * N_T * l1, "k": k}


def measure(backbone: str, sizes=(64, 128), head_tokens=(4, 8), cuda_policy: bool = True) -> dict:
    """Every fitted coefficient of one backbone (see the module docstring)."""
    from d3.latents import vae_scale_factor

    denoiser, vae, cond = build(backbone)
    scale = vae_scale_factor(vae)
    result = {"backbone": backbone, "sizes": list(sizes), "cuda_policy": cuda_policy}
    for mode, on in (("plain", False), ("checkpointed", True)):
        fits, shapes = measure_student(denoiser, cond, scale, sizes, on, cuda_policy)
        result[f"student_{mode}"] = fits
        result[f"vae_{mode}"] = measure_vae(vae, scale, sizes, on, cuda_policy)
    if backbone in ("flux-dev", "tiny-flux"):
        # the default layer set: the last 25 single blocks (all of a tiny model's), image tokens only
        n_layers = 25 if backbone == "flux-dev" else len(denoiser.layer_set(None))
        width, per_px = next(iter(shapes.values()))
        shapes = {f"single.{i}": (width, per_px) for i in range(n_layers)}
    result["layers"] = {k: list(v) for k, v in shapes.items()}
    result["heads"] = {str(w): measure_head(w, head_tokens, cuda_policy) for w in sorted({w for w, _ in
                                                                                          shapes.values()})}
    return result


# ----------------------------------------------------------------------------------------------- the recipes
# name, backbone, static row ("full", "fsdp", "lora<r>", "lora<r>-8bit"), GPUs, micro-batch, accumulation, resolution,
# --gradient_checkpointing (student and VAE), head checkpointing, where it comes from
RECIPES = [
    ("SD 2.1, 1 GPU, B=2 x GA 16 (the defaults)", "sd21", "full", 1, 2, 16, 768, False, False, "docs"),
    ("SD 2.1, 1 GPU, B=4 x GA 8 (the defaults before)", "sd21", "full", 1, 4, 8, 768, False, False, "before"),
    ("SD 2.1, 8 GPUs DDP, B=4", "sd21", "full", 8, 4, 1, 768, False, False, "before"),
    ("SD 2.1, 8 GPUs DDP, B=2 x GA 2 (docs/multi-gpu.md)", "sd21", "full", 8, 2, 2, 768, False, False, "docs"),
    ("SD 2.1, 8 GPUs DDP, B=4, --gradient_checkpointing", "sd21", "full", 8, 4, 1, 768, True, True, ""),
    ("SD 2.1, 1 GPU, B=4 x GA 8, --gradient_checkpointing", "sd21", "full", 1, 4, 8, 768, True, True, ""),
    ("FLUX.1-dev, FSDP 8 GPUs, B=1, checkpointing without the heads (before)", "flux-dev", "fsdp", 8, 1, 1, 768,
     True, False, "before"),
    ("FLUX.1-dev, FSDP 8 GPUs, B=1, --gradient_checkpointing (docs)", "flux-dev", "fsdp", 8, 1, 1, 768, True,
     True, "docs"),
    ("FLUX.1-dev, FSDP 8 GPUs, B=2, --gradient_checkpointing", "flux-dev", "fsdp", 8, 2, 1, 768, True, True, ""),
    ("FLUX.1-dev, LoRA 64, 1 GPU, B=1, checkpointing without the heads (before)", "flux-dev", "lora64", 1, 1,
     32, 768, True, False, "before"),
    ("FLUX.1-dev, LoRA 64, 1 GPU, B=1, --gradient_checkpointing", "flux-dev", "lora64", 1, 1, 32, 768, True, True,
     ""),
    ("FLUX.1-dev, LoRA 64, 1 GPU, B=1, no checkpointing", "flux-dev", "lora64", 1, 1, 32, 768, False, False, ""),
    ("FLUX.1-dev, LoRA 16, 1 GPU, B=1, --gradient_checkpointing", "flux-dev", "lora16", 1, 1, 32, 768, True, True,
     ""),
    ("FLUX.1-dev, LoRA 64, 1 GPU, B=1, --gradient_checkpointing --use_8bit_adam (docs)", "flux-dev", "lora64-8bit",
     1, 1, 32, 768, True, True, "docs"),
]
LORA_RANKS = (16, 64)
FIELDS = ("name", "backbone", "kind", "gpus", "batch", "accumulation", "resolution", "checkpointing",
          "head_checkpointing", "source")


def counts_for(backbone: str) -> dit_memory.Counts:
    """Exact parameter counts (full-depth FLUX.1-dev on the meta device); the tiny test models from their modules."""
    if backbone in ("sd21", "flux-dev"):
        return dit_memory.count(backbone, LORA_RANKS)
    from d3.heads import ProjectionHeads

    denoiser, vae, _ = build(backbone)
    layers = denoiser.layer_set(None)
    heads = dit_memory.part_of(ProjectionHeads(denoiser.feature_channels(layers)), "heads")
    heads.tensors.append(1)
    wrap = ("FluxTransformerBlock", "FluxSingleTransformerBlock") if backbone == "tiny-flux" else \
        dit_memory.FSDP_WRAP["sd21"]
    return dit_memory.Counts(backbone, dit_memory.part_of(denoiser.model, "student"), heads,
                             dit_memory.part_of(vae, "vae"),
                             {r: dit_memory.Part("lora", dit_memory.lora_tensors(
                                 denoiser.model, denoiser.lora_targets, r)) for r in LORA_RANKS},
                             len(layers), wrap, dit_memory.fsdp_units(denoiser.model, wrap))


def _student(fits: dict, batch: int, side: int, flux: bool) -> float:
    """Retained bytes of the student, the weight copies (W) left out: they are counted as `autocast copies`."""
    def part(label):
        f = fits.get(label)
        return 0.0 if f is None else at({**f, "W": 0.0}, batch, side)
    if flux:
        return part("rest") + FLUX_DOUBLE * part("double") + FLUX_SINGLE * part("single")
    return sum(part(label) for label in fits if label != "recompute peak")


def static_key(kind: str, gpus: int) -> str:
    """The benchmarks/dit_memory.py row of a recipe's kind."""
    if kind == "full":
        return "full-adamw"
    if kind == "fsdp":
        return f"fsdp{gpus}-adamw"
    rank, _, bits = kind[4:].partition("-")
    return f"lora{rank}-adamw{bits}"


def estimate(coef: dict, counts: dit_memory.Counts, recipe: dict) -> dict:
    """Bytes per GPU of one recipe, by part (see the module docstring and docs/memory.md)."""
    b, side, ckpt = recipe["batch"], recipe["resolution"], recipe["checkpointing"]
    flux = "flux" in recipe["backbone"]
    mode = "checkpointed" if ckpt else "plain"
    rows = {r["key"]: r for r in dit_memory.memory_rows(counts, recipe["gpus"], LORA_RANKS)}
    kind = recipe["kind"]
    row = rows[static_key(kind, recipe["gpus"])]
    static = row["bytes"]
    out = {"weights, gradients, optimizer states": static["trained_weights"] + static["grads"]
           + static["optimizer_states"], "frozen weights (teacher, VAE)": static["frozen_weights"]}
    heads_params, student_params = counts.heads.params, counts.student.params
    if kind == "fsdp":  # bf16 units gathered: the root (rest of the student + heads) + 2 blocks (prefetch)
        units = sorted(counts.fsdp_units)
        root = student_params - sum(units) + heads_params
        out["FSDP gathered bf16 units"] = 2 * (root + sum(units[-2:]))
    else:  # autocast's bf16 copies of fp32 weights (the cache lives through the forward)
        out["autocast bf16 weight copies"] = 2 * (heads_params + (student_params if kind == "full" else 0))
    if recipe["gpus"] > 1 and kind != "fsdp":
        out["DDP gradient buckets"] = 4 * row["trainable_params"]
    out["activations: student"] = _student(coef[f"student_{mode}"], b, side, flux)
    per_layer = [b * N_T * px * side * side * coef["heads"][str(w)]["k"] for w, px in coef["layers"].values()]
    out["activations: heads"] = 0.0 if recipe["head_checkpointing"] else sum(per_layer)
    out["activations: teacher (expert features)"] = sum(b * N_T * px * side * side * w * 2
                                                        for w, px in coef["layers"].values())
    vae = coef[f"vae_{mode}"]["vae"]
    out["activations: VAE decoder"] = at({**vae, "W": 0.0}, b, side)
    peaks = [max(per_layer) if recipe["head_checkpointing"] else 0.0]
    if ckpt:
        student_peak = coef["student_checkpointed"]["recompute peak"]
        peaks += [at(student_peak, b, side), at(coef["vae_checkpointed"]["recompute peak"], b, side)]
    out["backward recompute peak (largest segment)"] = max(peaks)
    out["CUDA context, workspaces (assumed)"] = OVERHEAD
    total = sum(out.values())
    return {"parts": out, "total": total}


def verdict(total: float, capacity: float) -> str:
    spare = 1 - total / capacity
    if spare >= 0.10:
        return f"fits, {spare:.0%} spare"
    return f"fits, only {spare:.0%} spare" if spare >= 0 else f"does not fit ({-spare:.0%} over)"


def report(coefs: dict[str, dict], capacity: float, recipes=RECIPES, resolution: int | None = None) -> dict:
    results = []
    counts = {}
    for values in recipes:
        recipe = dict(zip(FIELDS, values))
        if recipe["backbone"] not in coefs:
            continue
        if resolution:
            recipe["resolution"] = resolution
        if recipe["backbone"] not in counts:
            counts[recipe["backbone"]] = counts_for(recipe["backbone"])
        est = estimate(coefs[recipe["backbone"]], counts[recipe["backbone"]], recipe)
        results.append({**recipe, **est, "verdict": verdict(est["total"], capacity),
                         "fits_with_10pc": est["total"] <= 0.9 * capacity})
    return {"capacity_bytes": capacity, "recipes": results}


SHORT = {"weights, gradients, optimizer states": "trained w+g+opt", "frozen weights (teacher, VAE)": "frozen",
         "FSDP gathered bf16 units": "FSDP units", "autocast bf16 weight copies": "autocast copies",
         "DDP gradient buckets": "DDP buckets", "activations: student": "student act.",
         "activations: heads": "heads act.", "activations: teacher (expert features)": "expert feat.",
         "activations: VAE decoder": "VAE act.", "backward recompute peak (largest segment)": "recompute peak",
         "CUDA context, workspaces (assumed)": "CUDA ctx"}


def table(res: dict) -> str:
    """One row per recipe, one column per part (GB = 1e9 bytes per GPU)."""
    recipes = res["recipes"]
    parts = list(dict.fromkeys(p for r in recipes for p in r["parts"]))
    lines = ["| recipe (768² unless said) | " + " | ".join(SHORT.get(p, p) for p in parts)
             + f" | total | vs {res['capacity_bytes'] / GB:.1f} GB |",
             "|---|" + "---:|" * (len(parts) + 1) + "---|"]
    for r in recipes:
        cells = [f"{r['parts'].get(p, 0) / GB:.1f}" for p in parts]
        name = r["name"] + (f" ({r['resolution']}²)" if r["resolution"] != 768 else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{r['total'] / GB:.1f}** | {r['verdict']} |")
    return "\n".join(lines)


def per_resolution(coef: dict, resolutions, batch: int = 1) -> str:
    """Activation bytes per image by part and resolution, plain and checkpointed."""
    flux = "flux" in coef["backbone"]
    lines = [f"| {coef['backbone']}, per image (B={batch}), GB | " + " | ".join(f"{r}²" for r in resolutions) + " |",
             "|---|" + "---:|" * len(resolutions)]
    for mode in ("plain", "checkpointed"):
        cells = [_student(coef[f"student_{mode}"], batch, r, flux) for r in resolutions]
        lines.append(f"| student, {mode} | " + " | ".join(f"{c / GB:.2f}" for c in cells) + " |")
    heads = [sum(batch * N_T * px * r * r * coef["heads"][str(w)]["k"] for w, px in coef["layers"].values())
             for r in resolutions]
    lines.append("| heads (N_T = 3), plain | " + " | ".join(f"{c / GB:.2f}" for c in heads) + " |")
    experts = [sum(batch * N_T * px * r * r * w * 2 for w, px in coef["layers"].values()) for r in resolutions]
    lines.append("| teacher's expert features | " + " | ".join(f"{c / GB:.2f}" for c in experts) + " |")
    for mode in ("plain", "checkpointed"):
        cells = [at({**coef[f"vae_{mode}"]["vae"], "W": 0.0}, batch, r) for r in resolutions]
        lines.append(f"| VAE decoder, {mode} | " + " | ".join(f"{c / GB:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["sd21", "flux-dev"],
                   choices=["sd21", "flux-dev", "tiny", "tiny-flux"])
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 128], help="the two measured image sides")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 768, 1024], help="the per-image table")
    p.add_argument("--recipe_resolution", type=int, default=None, help="override every recipe's resolution")
    p.add_argument("--capacity", type=float, default=H100_BYTES, help="GPU bytes PyTorch can have (default: H100)")
    p.add_argument("--no_cuda_policy", action="store_true", help="keep CPU autocast's bf16 group/layer norms")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--coefficients", type=Path, nargs="+", default=[],
                   help="reuse the measurements of earlier --json files (one backbone per process keeps RAM low)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    coefs = {}
    for path in args.coefficients:
        coefs.update(json.loads(path.read_text())["coefficients"])
    for backbone in args.backbones:
        if backbone not in coefs:
            head_tokens = (2, 4) if backbone.startswith("tiny") else (4, 8)
            coefs[backbone] = measure(backbone, tuple(args.sizes), head_tokens, not args.no_cuda_policy)
    aliases = {"tiny": "sd21", "tiny-flux": "flux-dev"}  # the tiny models run the recipes' shapes, for the CI test
    recipes = [(n, next((k for k, v in aliases.items() if v == bb and k in coefs), bb), *rest)
               if bb not in coefs else (n, bb, *rest) for n, bb, *rest in RECIPES]
    res = report(coefs, args.capacity, recipes, args.recipe_resolution)
    for backbone, coef in coefs.items():
        print(per_resolution(coef, args.resolutions), "\n")
    print(table(res))
    res["coefficients"] = coefs
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
