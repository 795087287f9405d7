"""A training run's folders on disk: `checkpoint-N` (written whole or not at all), resuming from one, tidying what
a killed save left, and the inference folder exported from the student.

Separate from the loop (`d3.training`) because the on-disk protocol (a `.tmp` name until complete, the `.old` copy
while one is replaced, the trainer's counters beside accelerate's state) is its own contract, read by resume and by
the reliability tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from .checkpoint import D3Config, save_checkpoint
from .objective import D3Model
from .training_args import TaskRecipe

logger = logging.getLogger("d3.train")

# accelerate logs every file of `save_state` at INFO, naming the temporary .checkpoint-N.tmp folder the state is written
# to before its rename; `save_training_checkpoint` silences them and logs the final checkpoint-N folder itself.
ACCELERATE_SAVE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING):
    """Raise the named loggers' level to `level` (warnings and errors still pass) for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its .tmp name)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def clean_interrupted_saves(output_dir: Path) -> None:
    """Tidy what a run killed inside `save_training_checkpoint` left: a half-written `.checkpoint-N.tmp` is removed; a
    `.checkpoint-N.old` (the previous checkpoint-N, set aside while its replacement was renamed in) goes back in place
    if the replacement never arrived, and is removed otherwise. A complete checkpoint is never deleted."""
    for partial in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    for aside in output_dir.glob(".checkpoint-*.old"):
        final = output_dir / aside.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "training_state").is_dir():
        raise SystemExit(f"error: {path}: not a d3 training checkpoint (no training_state/ inside)")
    return path


def resume_training(accelerator, output_dir: Path, value: str | None) -> dict | None:
    """Load the checkpoint that --resume_from_checkpoint names into the prepared model, optimizer, scheduler and RNGs;
    returns its trainer state (steps and counters), or None for a new run."""
    resume = resolve_resume(output_dir, value)
    if resume is None:
        if value:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
        return None
    accelerator.load_state(str(resume / "training_state"))
    state = json.loads((resume / "training_state" / "trainer_state.json").read_text())
    accelerator.print(f"resumed from {resume} at step {state['global_step']}")
    return state


def export_predictor(path: Path, model: D3Model, vae, prompt_embeds, args, recipe: TaskRecipe,
                     full_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the inference folder. `full_state` is the D3Model's state dict gathered from FSDP shards (else None)."""
    timestep = model.student_timestep if full_state is None else full_state["student_timestep"]
    student_state = None if full_state is None else {
        k[len("student."):]: v for k, v in full_state.items() if k.startswith("student.")}
    adapter = getattr(args, "lora_rank", 0) > 0 and getattr(args, "save_lora_as", "merged") == "adapter"
    config = D3Config(
        task=recipe.task,
        student_timestep=float(timestep.detach().float()),
        prompt=args.prompt,
        processing_res=args.resolution,
        base_model=str(args.pretrained_model_name_or_path),
        architecture=model.denoiser.architecture,
        lora_adapter=f"{model.denoiser.subfolder}_lora" if adapter else "",
    )
    save_checkpoint(path, model.student, vae, prompt_embeds, config, state_dict=student_state)


def gather_for_export(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Under FSDP the student is sharded: gather its full state dict (a collective: every rank must call this)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.get_state_dict(model)


def checkpoint_exports(step: int, args) -> bool:
    """Whether checkpoint-`step` also holds the inference folder: every --export_every-th checkpoint, never the last
    step's (the run exports its final model into --output_dir, once). The same answer on every process."""
    every = getattr(args, "export_every", 1)
    return bool(every) and step < args.max_train_steps and step % (args.checkpointing_steps * every) == 0


def save_training_checkpoint(accelerator, model, output_dir: Path, step: int, trainer_state: dict,
                             export: Callable[[Path, dict | None], None] | None, total_limit: int | None) -> None:
    """Write `checkpoint-N` (accelerate's state, `trainer_state`, and the inference folder through `export` unless it
    is None) under a `.tmp` name, then rename it into place; keep the newest `total_limit` checkpoints (0 or None:
    all). Every process calls this, with the same `export` or None."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with quiet_loggers(*ACCELERATE_SAVE_LOGGERS):  # they would name the .tmp folder; the line below names the final
        accelerator.save_state(str(tmp / "training_state"))
    # Every process has written its part (its random states) before the main process renames the folder: without
    # this barrier a slower rank wrote into a folder already renamed away and failed.
    accelerator.wait_for_everyone()
    full_state = gather_for_export(accelerator, model) if export is not None else None
    if accelerator.is_main_process:
        (tmp / "training_state" / "trainer_state.json").write_text(json.dumps(trainer_state))
        if export is not None:
            export(tmp, full_state)
        aside = output_dir / f".checkpoint-{step}.old"
        if final.exists():  # an existing checkpoint-N is set aside, not deleted, until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("checkpoint saved to %s", final)
        if total_limit:
            for old in list_checkpoints(output_dir)[: -total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
