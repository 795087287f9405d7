"""Feeding the training loop: the sources and their sampler, the loader, bad samples, and each micro-step's
randomness.

Separate from the loop (`d3.training`) so that the data path (what a batch holds, which process draws which rows,
what a bad file does) can be read and tested without Accelerate or a model.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .data.folders import BadSampleError, collate, open_sources
from .data.mixing import RankSlice, concat, make_sampler, mixing_probabilities, parse_dataset_spec
from .training_args import TaskRecipe


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """Randomness of one micro-step derives from (seed, step) only, so a resumed run draws what an unbroken one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63 - 1))


def random_hflip(batch: dict, generator: torch.Generator, prob: float, flip_target, global_size: int | None = None,
                 rows: slice | None = None) -> dict:
    """Flip each image (and its target and native ground truth) left-right with probability `prob`; `flip_target`
    fixes values that change with the flip (the x component of normals). The draw covers the global batch of
    `global_size` images, of which this process holds `rows`."""
    if prob <= 0:
        return batch
    n = batch["rgb"].shape[0]
    flip = torch.rand(global_size or n, generator=generator)[rows or slice(0, n)] < prob
    if not flip.any():
        return batch
    out = dict(batch)
    for key in ("rgb", "target", "gt", "valid"):
        if key not in batch:
            continue
        fix = flip_target if key in ("target", "gt") else (lambda x: x)
        out[key] = [fix(x.flip(-1)) if f else x for x, f in zip(batch[key], flip.tolist())]
        if torch.is_tensor(batch[key]):
            out[key] = torch.stack(out[key])
    return out


def batch_to(batch: dict, device: torch.device) -> dict:
    """Tensors, and lists of tensors (native-size ground truth), to `device`; other entries unchanged."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return [x.to(device, non_blocking=True) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


class SkippingCollate:
    """Collate that drops unreadable samples (they arrive as BadSampleError messages) and reports them."""

    def __call__(self, items):
        good = [s for s in items if not isinstance(s, str)]
        bad = [s for s in items if isinstance(s, str)]
        batch = collate(good) if good else None
        return {"batch": batch, "bad": bad}


class SafeDataset(torch.utils.data.Dataset):
    """Wraps the training set: a bad sample becomes its error message (skip mode) or stops the run (error mode)."""

    def __init__(self, dataset, on_bad_sample: str):
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadSampleError as err:
            if self.on_bad_sample == "error":
                raise
            return str(err)


def stop_on_bad_sample(loader):
    """Iterate a loader; in --on_bad_sample error mode, a bad sample stops the run with one line naming its file."""
    try:
        yield from loader
    except BadSampleError as err:
        # From a worker process the message carries the worker's traceback; its last line is the cause.
        cause = str(err).strip().splitlines()[-1].split("BadSampleError: ", 1)[-1]
        raise SystemExit(f"error: bad training sample: {cause} (--on_bad_sample skip skips and counts such "
                         "samples)") from None


def build_training_data(args, recipe: TaskRecipe, num_processes: int = 1, process_index: int = 0):
    """Sources, their mixing probabilities, the dataset and this process's batch sampler. The sampler draws global
    batches of `train_batch_size × num_processes` and hands this process its slice (`RankSlice`)."""
    specs = args.dataset or recipe.default_datasets
    if not specs:
        raise SystemExit("error: no training data; pass --dataset PATH[:PROB] (see docs/data.md)")
    sources, given = [], []
    for spec in specs:
        path, prob = parse_dataset_spec(spec)
        try:
            found = open_sources(path, recipe.modality, args.resolution, recipe.encode_target, args.max_train_samples,
                                 loss_resolution=getattr(args, "loss_resolution", "native"))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        sources += found
        given += [prob] * len(found)
    defaults = recipe.paper_mixing if args.mixing == "paper" and recipe.paper_mixing else recipe.default_mixing
    names = [s.name for s in sources]
    probs = mixing_probabilities(names, given, defaults)
    dataset = SafeDataset(concat(sources), args.on_bad_sample)
    try:
        sampler = make_sampler(args.mixing, [len(s) for s in sources], probs, args.train_batch_size * num_processes,
                               args.seed, names)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if num_processes > 1:
        sampler = RankSlice(sampler, process_index, num_processes)
    return sources, probs, dataset, sampler


def make_loader(dataset, sampler, num_workers: int) -> DataLoader:
    """The loader over `build_training_data`'s dataset and sampler; bad samples arrive in each item's "bad" list."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=SkippingCollate(),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # its own generator: a fresh iterator (each epoch, or a resume's skipping loader) draws the workers' base
        # seed from it, never from the global RNG that accelerate checkpoints, so a resumed run's RNG state is exact
        generator=torch.Generator(),
    )
