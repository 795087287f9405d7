"""Teaching a tiny backbone's VAE to draw synthetic scenes' depth, normal and alpha maps (`python -m d3.tiny
--teach_vae_steps N`): why, in `d3.tiny`'s docstring. Imports no torch at the top, as `d3.tiny`."""


from __future__ import annotations


import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch


TINY_RECORD = "d3_tiny.json"  # how build_tiny_backbone made the folder (preset, seed)
# What `teach_vae` may teach: each synthetic scene's maps as 3-channel images in [-1, 1], as the training targets are.
TEACHABLE_MAPS = ("rgb", "depth", "normal", "alpha")
TEACH_RECORD = "d3_teach_vae.json"  # written into the taught backbone: the settings, for reuse and for the record
TEACH_SCENE_SEED = 80_000  # taught scenes are render_scene(80_000 + i): not d3.data.synthetic's hashed seeds


def depth_map_image(depth, low: float = 0.02, high: float = 0.98) -> torch.Tensor:
    """Depth (H,W) metres, 0 = invalid -> (3,H,W) in [-1, 1]: the 2 %/98 % quantiles of valid depth to -1/+1
    (clipped), far bright, invalid pixels at the far plane: the depth training target's normalisation."""
    import torch  # here, not at the top: `python -m d3.tiny --help` imports no torch

    depth = torch.as_tensor(depth, dtype=torch.float32)
    valid = depth > 0
    if not valid.any():
        return torch.ones(3, *depth.shape)
    lo, hi = torch.quantile(depth[valid], torch.tensor([low, high]))
    scaled = ((depth - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1).clamp(-1, 1)
    return torch.where(valid, scaled, torch.ones_like(scaled)).expand(3, -1, -1).contiguous()


def scene_map_images(scene, maps) -> list[torch.Tensor]:
    """A synthetic scene's requested maps as (3,H,W) images in [-1, 1]."""
    import torch  # here, not at the top: `python -m d3.tiny --help` imports no torch

    out = []
    for name in maps:
        if name == "rgb":
            out.append(torch.from_numpy(scene.rgb).permute(2, 0, 1).float() / 127.5 - 1)
        elif name == "depth":
            out.append(depth_map_image(scene.depth))
        elif name == "normal":
            out.append(torch.from_numpy(scene.normal).permute(2, 0, 1).float())
        elif name == "alpha":
            out.append(torch.from_numpy(scene.alpha).float()[None].expand(3, -1, -1) * 2 - 1)
        else:
            raise ValueError(f"unknown map {name!r}; expected some of {TEACHABLE_MAPS}")
    return out


# teach_vae's settings besides `steps` (the same defaults for the function and the command line)
TEACH_DEFAULTS = dict(lr=2e-3, maps=("depth", "normal", "alpha"), num_scenes=32, resolution=64, batch_size=8,
                      encoder=False, seed=0)


def teach_settings(source, steps: int, **options) -> dict:
    """The full record of a teaching run: `options` over TEACH_DEFAULTS, and the source backbone's record."""
    unknown = sorted(set(options) - set(TEACH_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown teach_vae options {unknown}; expected some of {sorted(TEACH_DEFAULTS)}")
    settings = {"steps": steps, **TEACH_DEFAULTS, **options}
    settings["maps"] = list(settings["maps"])
    unknown = sorted(set(settings["maps"]) - set(TEACHABLE_MAPS))
    if unknown or not settings["maps"]:
        raise ValueError(f"maps must be some of {TEACHABLE_MAPS}, got {settings['maps']}")
    return {**settings, "scene_seed": TEACH_SCENE_SEED, "source": source}


def teach_vae(backbone: str | Path, output: str | Path | None = None, steps: int = 300, **options) -> Path:
    """Teach a tiny backbone's VAE to reconstruct synthetic scenes' maps; write the taught backbone to `output`.

    Options (TEACH_DEFAULTS): `lr` (Adam), `maps` (some of TEACHABLE_MAPS), `num_scenes` and `resolution` (the
    scenes drawn), `batch_size`, `encoder`, `seed`. The decoder (and post-quant conv) learn to draw each map from its
    latent, the L1 error to the map; with `encoder` the encoder (and quant conv) learn too, as a plain autoencoder
    (no KL term). `output` None teaches `backbone` in place; otherwise `backbone` is copied there first.
    Deterministic in its arguments (fixed scene seeds, seeded batches). Taught scenes are
    ``render_scene(80_000 + i)``, none of the scenes `python -m d3.data.synthetic` writes (hashed seeds).

    The settings are written to ``<output>/d3_teach_vae.json``; when that file already holds the same settings (and
    the same source backbone's record), the folder is reused as it is."""

    import torch  # here, not at the top: `python -m d3.tiny --help` imports no torch
    from diffusers import AutoencoderKL

    from .data.synthetic import render_scene

    backbone = Path(backbone)
    output = Path(output) if output is not None else backbone
    settings = teach_settings(_read_json(backbone / TINY_RECORD), steps, **options)
    lr, maps, num_scenes, resolution, batch_size, encoder, seed = (
        settings[k] for k in ("lr", "maps", "num_scenes", "resolution", "batch_size", "encoder", "seed"))
    record = output / TEACH_RECORD
    if output != backbone and _same_settings(_read_json(record), settings) and (output / "vae").is_dir():
        return output  # taught before with the same settings
    if output != backbone:
        if output.exists():
            if any(output.iterdir()) and not (output / TEACH_RECORD).is_file():
                raise FileExistsError(f"{output}: exists and is not a taught backbone; choose a new folder")
            shutil.rmtree(output)  # taught before with other settings
        shutil.copytree(backbone, output)
    elif record.exists():
        raise ValueError(f"{backbone}: its VAE was taught already ({record}); teach a fresh copy instead")

    images = []
    for i in range(num_scenes):
        images += scene_map_images(render_scene(TEACH_SCENE_SEED + i, resolution, resolution), maps)
    images = torch.stack(images)
    vae = AutoencoderKL.from_pretrained(output / "vae").requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    if encoder:
        params += [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    else:
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(images), (batch_size,), generator=generator)
        latent = vae.encode(images[pick]).latent_dist.mean if encoder else latents[pick]
        loss = (vae.decode(latent).sample - images[pick]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    shutil.rmtree(output / "vae")
    vae.requires_grad_(False).save_pretrained(output / "vae")
    settings["final_l1"] = round(float(loss.detach()), 6) if steps else None
    record.write_text(json.dumps(settings, indent=2) + "\n")
    return output


def _same_settings(record, settings: dict) -> bool:
    return isinstance(record, dict) and {k: v for k, v in record.items() if k != "final_l1"} == settings


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
