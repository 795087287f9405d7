"""Offline backbones: a tiny SD-style diffusers folder for tests, and an SD 2.1-sized random one for speed work.

No machine of this project can download Stable Diffusion, so every test, benchmark and smoke run builds its
backbone here from configs and then loads it through the *real* loading code (`d3.backbone.load_backbone`), exactly
as it would load `stabilityai/stable-diffusion-2-1`.

    python -m d3.tiny --output /tmp/tiny-sd            # seconds on a CPU
    python -m d3.tiny --preset sd21 --output /tmp/sd21  # random-init SD 2.1 shapes (~1.3B parameters with CLIP-H)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# SD 2.1's noise schedule (scaled-linear betas, v-prediction, 1000 steps).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    steps_offset=1,
)

PRESETS: dict[str, dict] = {
    # Three UNet levels with cross-attention, VAE downsampling 4x: a 64x64 image is a 16x16 latent.
    "tiny": dict(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=32,
            norm_num_groups=16,
            use_linear_projection=True,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
        ),
    ),
    # Stable Diffusion 2.1 (768-v) shapes, random weights: for speed and memory measurements.
    "sd21": dict(
        unet=dict(
            sample_size=96,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            projection_dim=512,
            hidden_act="gelu",
        ),
    ),
}


def _byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A complete byte-level BPE vocabulary without merges: every text tokenizes, nothing is downloaded."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, []


def unet_config(preset: str = "tiny") -> dict:
    return dict(PRESETS[preset]["unet"])


def build_tiny_backbone(output_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers SD-style folder (unet/ vae/ scheduler/ text_encoder/ tokenizer/) with random weights.

    Deterministic in `seed`, so every test session builds the same backbone.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    UNet2DConditionModel(**spec["unet"]).save_pretrained(out / "unet")
    AutoencoderKL(**spec["vae"]).save_pretrained(out / "vae")
    DDPMScheduler(**SD21_SCHEDULER).save_pretrained(out / "scheduler")

    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(out / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **spec["text"],
    )
    CLIPTextModel(text_config).save_pretrained(out / "text_encoder")

    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "d3_preset": preset,
            },
            indent=2,
        )
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the diffusers backbone into")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_backbone(args.output, args.preset, args.seed)
    print(f"wrote {args.preset} backbone to {path}")


if __name__ == "__main__":
    main()
