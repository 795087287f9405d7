"""An independent oracle of the D³-Predictor authors' training step, written from their code; shares nothing with d3.

Reproduced from the authors' repository (X-GenGroup/D3-Predictor), per folder `D3-Predictor-{Depth,Normal,Matting}`:
- `src/sd_visual_experts_<task>.py`: `SD21UNetFeatureExtractor.forward` (which UNet outputs are features),
  `FFNStack`, `StableFeatureAligner.forward` (stratified timesteps, noise, teacher/student calls, heads, cosine,
  the task losses);
- `src/min_sd21.py`: how the up blocks return per-layer outputs (an upsampler's output replaces the last layer's);
- `src/layers.py`: FeedForwardBlock, RMSNorm, AdaRMSNorm, MappingNetwork, LinearSwiGLU, FourierFeatures;
- `src/ae.py`: latent = scaling_factor * posterior draw, decode(latent / scaling_factor);
- `src/dataloader.py`: how one sample is read and resized; `vae_image_processor.py`: postprocess = clamp(x/2+1/2);
- `train_<task>.py` and `configs/sd21_d3_predictor_<task>.yaml`: total = Σ_k (1 + neg_cossim_k) + Σ λ·term,
  head sizes (mapping width 256, d_ff 768, depth 2; adapters FFNStack depth 3, expansion 1).

Deliberate deviations, each marked where it happens:
- dtype: the authors cast inputs and models to bf16 (so even the heads' t/999 is bf16-rounded); the oracle runs in
  the student's parameter dtype (float64 in the tests). Their float32 SSI accumulation becomes max(dtype, float32).
- VAE posterior: the authors draw `.sample()`; the oracle takes the posterior mean by default (as d3 does) and
  `posterior="sample"` draws from the passed generator (also consuming the draw of the unused target latent).
  The authors VAE-encode the target too and never use it; the oracle does not encode it.
- text: one prompt embedding (1, L, D) for every sample instead of per-sample captions.
- valid-depth ranges follow each sample's own source (stem prefix); the authors use the batch's first sample, and
  their sampler makes single-source batches. Ground truths of different native sizes in one batch (impossible in
  their collate) are handled by summing per copy and pooling, which equals their batched expressions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

LOSS_WEIGHTS = {  # train_<task>.py
    "depth": {"mse_sample": 8.0, "ssi_sample": 2.0, "gradient": 100.0},
    "normal": {"mse_sample": 8.0, "angular_sample": 3.0},
    "matting": {"mse_sample": 5.0, "l1_sample": 10.0, "gradient": 50.0},
}
DEPTH_RANGES = {"ai": (1e-5, 65.0), "Scene": (1e-5, 80.0), "coco": (1e-5, 80.0)}  # hypersim, vkitti, coco
SD21_FEATURE_DIMS = {"mid": 1280, **{f"us{i}": 1280 for i in range(1, 7)}, "us7": 640, "us8": 640, "us9": 640,
                     "us10": 320}


# ---------------------------------------------------------------------------------------- features, walked by hand
def unet_features(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
    """mid, us1, us2, ... and the final `sample`, walking a diffusers UNet2DConditionModel block by block.

    Per up block but the last: its layers' outputs except the last one, then its upsampler's output; of the last up
    block only its first layer's output (the authors' 4-block rule, for any number of blocks)."""
    t = t.expand(x.shape[0])
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    skips = [h]
    for block in unet.down_blocks:
        for i, resnet in enumerate(block.resnets):
            h = resnet(h, emb)
            if getattr(block, "attentions", None):
                h = block.attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
            skips.append(h)
        for down in block.downsamplers or []:
            h = down(h)
            skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    feats = {"mid": h}
    odd_size = any(s % 2 ** unet.num_upsamplers for s in x.shape[-2:])
    for b, block in enumerate(unet.up_blocks):
        last_block = b == len(unet.up_blocks) - 1
        outs = []
        for i, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if getattr(block, "attentions", None):
                h = block.attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
            outs.append(h)
        for up in block.upsamplers or []:
            h = up(h, skips[-1].shape[2:] if odd_size and not last_block else None)
            outs[-1] = h
        for o in outs[:1] if last_block else outs:
            feats[f"us{len(feats)}"] = o
    feats["sample"] = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return feats


# ------------------------------------------------------------------------ heads, from the authors' module layout
def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    inv = torch.rsqrt(x.to(dtype).pow(2).mean(-1, keepdim=True) + eps)
    return x * (scale.to(dtype) * inv).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _rms_norm(x, self.scale)


class AdaRMSNorm(nn.Module):
    """Scale 1 + linear(c), linear zero-initialised."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x, c):
        return _rms_norm(x, self.linear(c)[:, None, :] + 1)


class FeedForward(nn.Module):
    """x + down(value * silu(gate)) of the (Ada)RMS-normed x; `up_proj` rows: value first, gate second."""

    def __init__(self, dim: int, hidden: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = AdaRMSNorm(dim, cond_dim) if cond_dim else RMSNorm(dim)
        self.up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x, c=None):
        value, gate = self.up_proj(self.norm(x) if c is None else self.norm(x, c)).chunk(2, dim=-1)
        return x + self.down_proj(value * F.silu(gate))


class Mapping(nn.Module):
    def __init__(self, width: int, hidden: int, depth: int):
        super().__init__()
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList(FeedForward(width, hidden) for _ in range(depth))
        self.out_norm = RMSNorm(width)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class FFNStack(nn.Module):
    def __init__(self, dim: int, cond_dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(FeedForward(dim, dim, cond_dim) for _ in range(depth))

    def forward(self, x, c):
        for layer in self.layers:
            x = layer(x, c)
        return x


class AuthorsHeads(nn.Module):
    """c = mapping(time_in_proj(Fourier(t / 999))); per key `adapters[key](tokens (N, L, C), c)`. State-dict keys are
    the authors': time_emb.weight (a buffer), time_in_proj.weight, mapping.*, adapters.<key>.layers.<i>.*"""

    def __init__(self, feature_dims: dict[str, int], width: int = 256, d_ff: int = 768, mapping_depth: int = 2,
                 adapter_depth: int = 3, t_max_model: float = 999.0, generator: torch.Generator | None = None):
        super().__init__()
        self.t_max_model = t_max_model
        self.time_emb = nn.Module()
        self.time_emb.register_buffer("weight", torch.randn(width // 2, 1, generator=generator))
        self.time_in_proj = nn.Linear(width, width, bias=False)
        self.mapping = Mapping(width, d_ff, mapping_depth)
        self.adapters = nn.ModuleDict({k: FFNStack(c, width, adapter_depth) for k, c in feature_dims.items()})

    def condition(self, t: torch.Tensor) -> torch.Tensor:
        x = t.reshape(-1, 1).to(self.time_in_proj.weight.dtype) / self.t_max_model  # authors: bf16 before the /
        f = 2 * math.pi * x @ self.time_emb.weight.T
        return self.mapping(self.time_in_proj(torch.cat([f.cos(), f.sin()], dim=-1)))

    def forward(self, tokens: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.condition(t)
        return {k: self.adapters[k](v, c) for k, v in tokens.items()}


# ------------------------------------------------------------------------------------- data, from the raw files
def load_rgb(path: str, res: int) -> torch.Tensor:
    """PIL RGB -> PIL bilinear (R, R) (torchvision Resize on a PIL image) -> /255 in float32 -> [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((res, res), Image.BILINEAR)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(255) * 2 - 1


def load_h5(path: str, res: int | None = None) -> torch.Tensor:
    """Key `depth`, H×W(×C) -> (C, H, W) in the file's dtype (to_tensor); optionally bilinear to (R, R), no AA."""
    with h5py.File(path, "r") as f:
        a = f["depth"][:]
    x = torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    if res is not None:
        x = F.interpolate(x[None], size=(res, res), mode="bilinear", align_corners=False)[0]
    return x


def _find(folder: str, stem: str, exts: tuple[str, ...]) -> str:
    for ext in exts:
        if os.path.exists(p := os.path.join(folder, stem + ext)):
            return p
    raise FileNotFoundError(f"no {stem}{{{','.join(exts)}}} in {folder}")


def load_batch(root: str, stems: list[str], task: str, res: int) -> dict:
    """rgb (B,3,R,R), target (B,3,R,R), native: per sample (C,H,W) at native size (depth, normal), valid ranges."""
    rgb, target, native, ranges = [], [], [], []
    for name in stems:
        stem = os.path.splitext(os.path.basename(name))[0]
        if task == "matting":  # P3M: blurred_image/*.jpg, mask/*.png, both through load_image
            rgb.append(load_rgb(_find(os.path.join(root, "blurred_image"), stem, (".jpg",)), res))
            target.append(load_rgb(_find(os.path.join(root, "mask"), stem, (".png",)), res))
            continue
        ext = (".png",) if stem.startswith("ai") else (".jpg",) if stem.startswith(("Scene", "coco")) else (
            ".png", ".jpg", ".jpeg")
        rgb.append(load_rgb(_find(os.path.join(root, "rgb"), stem, ext), res))
        gt = os.path.join(root, "depth" if task == "depth" else "normal", stem + ".h5")
        target.append(load_h5(gt, res) * 2 - 1 if task == "depth" else load_h5(gt, res))
        native.append(load_h5(os.path.join(root, "depth_ori", stem + ".h5")) if task == "depth" else load_h5(gt))
        ranges.append(next((r for p, r in DEPTH_RANGES.items() if stem.startswith(p)), None))  # None: all valid
    return {"rgb": torch.stack(rgb), "target": torch.stack(target), "native": native, "ranges": ranges}


# ------------------------------------------------------------------------------------------------------ the step
def draw_timesteps(b: int, n_t: int, generator=None, t_min: int = 1, t_max: int = 999) -> torch.Tensor:
    """floor(t_min + u·w + k·w), w = (t_max − t_min)/n_t, u ~ U[0,1) in float32, k = 0..n_t−1: (B, N_T) long."""
    w = (t_max - t_min) / n_t
    return (t_min + torch.rand((b, n_t), generator=generator) * w + torch.arange(n_t)[None, :] * w).long()


def _encode(vae, x: torch.Tensor, posterior: str, generator) -> torch.Tensor:
    dist = vae.encode(x).latent_dist
    z = dist.mean if posterior == "mean" else dist.sample(generator)  # deviation: authors always .sample()
    return z * vae.config.scaling_factor


def _bilinear(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _ssi(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Closed-form LS scale/shift of pred to gt over valid, L1 over valid; 0 if no valid pixel or det ≤ 1e-6."""
    if not valid.any():
        return pred.new_zeros(())
    acc = torch.promote_types(pred.dtype, torch.float32)  # authors: .float()
    p, g, m = pred.to(acc), gt.to(acc), valid.to(acc)
    a00, a01, a11 = (m * p * p).sum(), (m * p).sum(), m.sum()
    b0, b1 = (m * p * g).sum(), (m * g).sum()
    det = a00 * a11 - a01 * a01
    if not det > 1e-6:
        return pred.new_zeros(())
    s, b = ((a11 * b0 - a01 * b1) / (det + 1e-6)).to(pred.dtype), ((a00 * b1 - a01 * b0) / (det + 1e-6)).to(pred.dtype)
    return ((s * pred + b)[valid] - gt[valid]).abs().mean()


def _log_gradient_sums(r: torch.Tensor, valid: torch.Tensor):
    s = 2 if r.shape[-2] > 2 and r.shape[-1] > 2 else 1
    mh, mv = valid[..., :, :-s] & valid[..., :, s:], valid[..., :-s, :] & valid[..., s:, :]
    total = ((r[..., :, :-s] - r[..., :, s:]).abs() * mh).sum() + ((r[..., :-s, :] - r[..., s:, :]).abs() * mv).sum()
    return total, mh.sum() + mv.sum()


def depth_losses(decoded, target, native, ranges, n_t: int) -> dict[str, torch.Tensor]:
    """mse_sample, ssi_sample, gradient as in sd_visual_experts_depth.py, summed per copy and pooled."""
    sq, cnt, sq_all, cnt_all, ssi, g_sum, g_cnt = 0, 0, 0, 0, [], 0, 0
    for i in range(decoded.shape[0]):
        b = i // n_t
        d, size = native[b].to(decoded.dtype), native[b].shape[-2:]
        lo_hi = ranges[b]
        valid = ((d > lo_hi[0]) & (d < lo_hi[1]) if lo_hi else torch.ones_like(d, dtype=torch.bool))[None]
        dec, tgt = decoded[i:i + 1], target[b:b + 1]
        err = (_bilinear(dec.mean(1, keepdim=True), size) - _bilinear(tgt.mean(1, keepdim=True), size)) ** 2
        sq, cnt, sq_all, cnt_all = sq + err[valid].sum(), cnt + valid.sum(), sq_all + err.sum(), cnt_all + err.numel()
        pred01 = _bilinear((dec * 0.5 + 0.5).clamp(0, 1), size).mean(1, keepdim=True)  # postprocess, resize, mean
        ssi.append(_ssi(pred01[0, 0], d[0], valid[0, 0]))
        tgt_n = tgt if tgt.shape[-2:] == size else _bilinear(tgt, size)
        r = torch.log1p(pred01) - torch.log1p((tgt_n.mean(1, keepdim=True) * 0.5 + 0.5).clamp(0, 1))
        gs, gc = _log_gradient_sums(r, valid)
        g_sum, g_cnt = g_sum + gs, g_cnt + gc
    zero = decoded.new_zeros(())
    return {"mse_sample": sq / cnt if cnt > 0 else sq_all / cnt_all,  # authors: unmasked MSE if nothing is valid
            "ssi_sample": torch.stack(ssi).mean(),
            "gradient": g_sum / g_cnt if cnt > 0 and g_cnt > 0 else zero}


def normal_losses(decoded, target, native, n_t: int) -> dict[str, torch.Tensor]:
    """mse_sample (3 channels, valid pixels) and angular_sample (float64 cosine vs native normals), pooled."""
    sq, cnt, ang, n_valid = 0, 0, 0, 0
    for i in range(decoded.shape[0]):
        b = i // n_t
        nat = native[b].to(decoded.dtype)[None]
        dec = _bilinear(decoded[i:i + 1], nat.shape[-2:])
        valid = nat.norm(dim=1) > 1e-4  # (1, H, W)
        err = (dec - _bilinear(target[b:b + 1], nat.shape[-2:])) ** 2
        sq, cnt = sq + err[valid[:, None].expand_as(err)].sum(), cnt + 3 * valid.sum()
        cos = F.cosine_similarity(dec.double(), nat.double(), dim=1)
        angle = cos.clamp(-1 + 1e-4, 1 - 1e-4).acos().to(decoded.dtype)
        ang, n_valid = ang + angle[valid].sum(), n_valid + valid.sum()
    zero = decoded.new_zeros(())
    return {"mse_sample": sq / cnt if cnt > 0 else zero, "angular_sample": ang / n_valid if n_valid > 0 else zero}


def matting_losses(decoded, target, n_t: int) -> dict[str, torch.Tensor]:
    """mse_sample, l1_sample at R×R and the 1/2/4 multi-scale gradient loss of the [0,1] channel means."""
    tgt = target.repeat_interleave(n_t, dim=0)
    pred01 = (decoded * 0.5 + 0.5).clamp(0, 1).mean(1, keepdim=True)
    tgt01 = (tgt.mean(1, keepdim=True) * 0.5 + 0.5).clamp(0, 1)
    grad = 0
    for s in (1, 2, 4):
        p, g = F.avg_pool2d(pred01, s, s), F.avg_pool2d(tgt01, s, s)
        dx = F.l1_loss(p[..., :, 1:] - p[..., :, :-1], g[..., :, 1:] - g[..., :, :-1])
        dy = F.l1_loss(p[..., 1:, :] - p[..., :-1, :], g[..., 1:, :] - g[..., :-1, :])
        grad = grad + dx + dy
    return {"mse_sample": F.mse_loss(decoded, tgt), "l1_sample": F.l1_loss(decoded, tgt), "gradient": grad / 3}


@dataclass
class OracleStep:
    total: torch.Tensor
    align: dict[str, torch.Tensor]  # key -> 1 + neg_cossim_key
    task: dict[str, torch.Tensor]  # the authors' names: mse_sample, ssi_sample, gradient, angular_sample, l1_sample
    prediction: torch.Tensor  # the student's decoded sample, (B·N_T, 3, R, R), copies of one image adjacent
    timesteps: torch.Tensor  # (B, N_T) long
    noise: torch.Tensor  # (B·N_T, C, h, w)
    batch: dict  # load_batch's output: rgb, target, native, ranges


def authors_step(student, timestep: torch.Tensor, teacher, vae, scheduler, heads: AuthorsHeads | None,
                 prompt_embeds: torch.Tensor, root: str, stems: list[str], task: str, resolution: int,
                 generator: torch.Generator | None = None, *, n_t: int = 3, timesteps: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, posterior: str = "mean") -> OracleStep:
    """One training step of StableFeatureAligner.forward + train_<task>.py's total; `heads=None`: no head (Table 7).

    student/teacher: diffusers UNets (the teacher frozen); timestep: the learned scalar (a Parameter, for its grad);
    prompt_embeds (1, L, D); root + stems (or file names) in the task's folder layout. Random draws come from
    `generator` in the authors' order: timesteps, [posterior draws of the RGB and of the (unused) target latents if
    posterior="sample"], noise; explicit `timesteps` (B, N_T) / `noise` (B·N_T, C, h, w) replace their draws."""
    if posterior not in ("mean", "sample") or task not in LOSS_WEIGHTS:
        raise ValueError(f"posterior {posterior!r} must be mean|sample, task {task!r} one of {list(LOSS_WEIGHTS)}")
    dtype = next(student.parameters()).dtype
    batch = load_batch(root, stems, task, resolution)
    x, y = batch["rgb"].to(dtype), batch["target"].to(dtype)
    b = x.shape[0]
    t = draw_timesteps(b, n_t, generator) if timesteps is None else timesteps.long()
    n_t = t.shape[1]
    tf = t.reshape(-1)
    context = prompt_embeds.to(dtype).expand(b * n_t, -1, -1)
    with torch.no_grad():
        z = _encode(vae, x, posterior, generator)
        if posterior == "sample":  # the authors also encode the target with .sample() and never use it
            torch.randn(z.shape, generator=generator, dtype=z.dtype)
        z = z.repeat_interleave(n_t, dim=0)
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        noise = noise.to(z.dtype).reshape(z.shape)
        expert = unet_features(teacher, scheduler.add_noise(z, noise, tf), tf, context)
        expert.pop("sample")
    feats = unet_features(student, z, (torch.ones_like(t) * timestep).reshape(-1), context)
    sample = feats.pop("sample")
    tokens = {k: v.flatten(2).transpose(1, 2) for k, v in feats.items()}  # (B·N_T, H·W, C)
    if heads is not None:
        tokens = heads(tokens, tf)
    align = {k: 1 + -F.cosine_similarity(tokens[k], v.flatten(2).transpose(1, 2).detach(), dim=-1).mean()
             for k, v in expert.items()}
    decoded = vae.decode(sample / vae.config.scaling_factor).sample
    if task == "depth":
        terms = depth_losses(decoded, y, batch["native"], batch["ranges"], n_t)
    elif task == "normal":
        terms = normal_losses(decoded, y, batch["native"], n_t)
    else:
        terms = matting_losses(decoded, y, n_t)
    total = sum(align.values()) + sum(LOSS_WEIGHTS[task][k] * v for k, v in terms.items())
    return OracleStep(total, align, terms, decoded, t, noise, batch)
