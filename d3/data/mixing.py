"""Mixing several training sources (paper appendix 6.3): two samplers, each batch from ONE source.

`--mixing official` (the default) is the one that trained the released checkpoints. `OfficialMixSampler` has the
semantics of the authors' `MixedBatchSampler` (D3-Predictor-Depth/src/dataloader.py, which `MixedDataModule` builds
with shuffle=True, drop_last=True): at the start of an epoch each source is shuffled and cut into full batches (its
incomplete last batch is dropped); then, batch after batch, a source is drawn with the given probabilities among the
sources that still have batches left, the probabilities being renormalised whenever a source runs out. Every full
batch of every source is used exactly once per epoch, so a source's share of the batches is its share of the data;
the probabilities only shape the order (a likely source tends to come early, an unlikely one fills the epoch's end).
A source with probability 0 is left out. (The authors' single-source path, a plain shuffled DataLoader, kept the
incomplete last batch; here a lone source drops it too, which costs at most one batch per epoch.)

`--mixing paper` reads the paper's sentence literally. `PaperMixSampler` draws each batch's source with the given
probabilities, independently, with replacement, so the shares are the probabilities whatever the sizes; each source
is read in a shuffled order that is reshuffled when used up, so a small source repeats within an epoch.

Both samplers are pure functions of (seed, epoch): `epoch_batches(epoch)` lists an epoch's batches with their source,
so a resumed run replays exactly what an unbroken run saw, the realised mixture of any prefix of the run can be
recomputed (`running_shares`), and a data-parallel loader can later hand each rank a slice of every global batch
without changing the mixture.
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch.utils.data import ConcatDataset, Sampler

from ..flags import MIXING_MODES, parse_dataset_spec  # noqa: F401  (in the light module: the flags check them)

logger = logging.getLogger("d3.train")


def mixing_probabilities(names: list[str], given: list[float | None], defaults: dict[str, float]) -> list[float]:
    """Explicit probabilities where given, the task's default share for a source otherwise; renormalised to 1.

    A source whose kind has no default weight gets the mean default weight, so adding one folder never starves it.
    """
    fallback = sum(defaults.values()) / len(defaults) if defaults else 1.0
    weights = [g if g is not None else defaults.get(n, fallback) for n, g in zip(names, given)]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixing probabilities must be non-negative and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def full_batches(sizes: list[int], probabilities: list[float], batch_size: int) -> list[int]:
    """Batches per epoch of each source under official mixing (incomplete batches dropped, p = 0 left out)."""
    return [s // batch_size if p > 0 else 0 for s, p in zip(sizes, probabilities)]


def expected_shares(mode: str, sizes: list[int], probabilities: list[float], batch_size: int) -> list[float]:
    """Each source's expected share of an epoch's batches: its share of the full batches (official), or its
    renormalised probability (paper). Official sizes 40/10/10 with batch 2 give 4/6, 1/6, 1/6 whatever the p."""
    if mode == "official":
        counts = full_batches(sizes, probabilities, batch_size)
        total = sum(counts)
        return [c / total if total else 0.0 for c in counts]
    if mode == "paper":
        total = sum(probabilities)
        return [p / total for p in probabilities]
    raise ValueError(f"unknown mixing mode {mode!r}; expected one of {MIXING_MODES}")


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Stream 0 orders an epoch's sources, stream 1 + i shuffles source i; all from (seed, epoch) only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + stream) % (2**63 - 1))


def _describe(names: list[str], sizes: list[int]) -> str:
    return ", ".join(f"{n}: {s} samples" for n, s in zip(names, sizes))


class _SourceMixSampler(Sampler[list[int]]):
    """Shared part: batches of indices into `ConcatDataset(sources)` (sizes in that order), one source per batch.

    `__len__` (batches per epoch) is the same in every epoch, so the training loop's (epoch, batch) arithmetic
    holds across a resume."""

    mode = ""

    def __init__(self, sizes: list[int], probabilities: list[float], batch_size: int, seed: int = 0,
                 names: list[str] | None = None):
        if not sizes or len(sizes) != len(probabilities):
            raise ValueError("one probability per source is needed")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if any(p < 0 for p in probabilities) or sum(probabilities) <= 0:
            raise ValueError(f"mixing probabilities must be non-negative and not all zero, got {list(probabilities)}")
        total = float(sum(probabilities))
        self.sizes = [int(s) for s in sizes]
        self.probabilities = [float(p) / total for p in probabilities]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(sizes))]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._order_cache: tuple[int, torch.Tensor] | None = None

    # --- to be given by each mode
    def source_order(self, epoch: int) -> list[int]:
        """The source of each of the epoch's batches, in order (cheap: no sample indices are drawn)."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """The epoch's batches as (source, indices into the ConcatDataset); a pure function of (seed, epoch)."""
        raise NotImplementedError

    # --- common
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for _, batch in self.epoch_batches(self.epoch):
            yield batch

    def expected_shares(self) -> list[float]:
        return expected_shares(self.mode, self.sizes, self.probabilities, self.batch_size)

    def source_of(self, index: int) -> int:
        """The source an index of the ConcatDataset belongs to (its offsets, as ConcatDataset computes them)."""
        return bisect.bisect_right(self.offsets, index) - 1

    def _order_tensor(self, epoch: int) -> torch.Tensor:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, torch.tensor(self.source_order(epoch), dtype=torch.long))
        return self._order_cache[1]

    def _full_epoch_counts(self, epochs: int) -> torch.Tensor:
        """Batches per source over epochs 0 .. epochs-1."""
        raise NotImplementedError

    def batch_counts(self, n_batches: int) -> list[int]:
        """Batches per source among the run's first `n_batches` batches (epoch 0 onwards)."""
        full, rest = divmod(n_batches, len(self))
        counts = self._full_epoch_counts(full).clone()
        if rest:
            counts += torch.bincount(self._order_tensor(full)[:rest], minlength=len(self.sizes))
        return counts.tolist()

    def running_shares(self, n_batches: int) -> dict[str, float]:
        """{'mix/<source>': its share of the run's first `n_batches` batches}; sources of one name are summed."""
        shares: dict[str, float] = {}
        for name, count in zip(self.names, self.batch_counts(n_batches)):
            key = f"mix/{name}"
            shares[key] = shares.get(key, 0.0) + count / max(n_batches, 1)
        return shares


class OfficialMixSampler(_SourceMixSampler):
    """The authors' semantics (module docstring): every full batch of every source exactly once per epoch."""

    mode = "official"

    def __init__(self, sizes: list[int], probabilities: list[float], batch_size: int, seed: int = 0,
                 names: list[str] | None = None):
        super().__init__(sizes, probabilities, batch_size, seed, names)
        self.batches_per_source = full_batches(self.sizes, self.probabilities, batch_size)
        if not any(self.batches_per_source):
            raise ValueError(
                f"no training source has a full batch of {batch_size} samples ({_describe(self.names, self.sizes)}; "
                f"probabilities {[round(p, 3) for p in self.probabilities]}): official mixing drops each source's "
                "incomplete batch; lower --train_batch_size, add samples, or use --mixing paper")
        for name, size, p, n in zip(self.names, self.sizes, self.probabilities, self.batches_per_source):
            if p > 0 and n == 0:
                logger.warning("source %s has %d samples, less than one batch of %d: official mixing leaves it out",
                               name, size, batch_size)

    def __len__(self) -> int:
        return sum(self.batches_per_source)

    def source_order(self, epoch: int) -> list[int]:
        remaining = list(self.batches_per_source)
        weights = [p if n else 0.0 for p, n in zip(self.probabilities, remaining)]
        uniforms = torch.rand(len(self), generator=_generator(self.seed, epoch, 0), dtype=torch.float64).tolist()
        order = []
        for u in uniforms:
            target, running, pick = u * sum(weights), 0.0, -1
            for i, w in enumerate(weights):
                if w > 0:
                    running, pick = running + w, i
                    if target < running:
                        break
            order.append(pick)
            remaining[pick] -= 1
            if remaining[pick] == 0:  # this source is used up: it drops out, the others renormalise
                weights[pick] = 0.0
        return order

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        cut = []
        for i, (size, n, offset) in enumerate(zip(self.sizes, self.batches_per_source, self.offsets)):
            perm = torch.randperm(size, generator=_generator(self.seed, epoch, 1 + i)).tolist() if n else []
            bs = self.batch_size
            cut.append([[offset + j for j in perm[k * bs:(k + 1) * bs]] for k in range(n)])
        taken = [0] * len(self.sizes)
        batches = []
        for source in self.source_order(epoch):
            batches.append((source, cut[source][taken[source]]))
            taken[source] += 1
        return batches

    def _full_epoch_counts(self, epochs: int) -> torch.Tensor:
        return torch.tensor(self.batches_per_source, dtype=torch.long) * epochs


class PaperMixSampler(_SourceMixSampler):
    """The paper's text (module docstring): each batch's source drawn with the probabilities, with replacement.

    An epoch is as many batches as official mixing would give, counting at least one per source with p > 0."""

    mode = "paper"

    def __init__(self, sizes: list[int], probabilities: list[float], batch_size: int, seed: int = 0,
                 names: list[str] | None = None):
        super().__init__(sizes, probabilities, batch_size, seed, names)
        empty = [n for n, s, p in zip(self.names, self.sizes, self.probabilities) if p > 0 and s == 0]
        if empty:
            raise ValueError(f"sources {empty} have no samples but a mixing probability above 0 "
                             f"({_describe(self.names, self.sizes)})")
        self._cumulative = torch.tensor(self.probabilities, dtype=torch.float64).cumsum(0)
        self._last_drawable = max(i for i, p in enumerate(self.probabilities) if p > 0)
        self._tally: tuple[int, torch.Tensor] = (0, torch.zeros(len(self.sizes), dtype=torch.long))

    def __len__(self) -> int:
        return max(1, sum(max(1, s // self.batch_size) for s, p in zip(self.sizes, self.probabilities) if p > 0))

    def source_order(self, epoch: int) -> list[int]:
        uniforms = torch.rand(len(self), generator=_generator(self.seed, epoch, 0), dtype=torch.float64)
        picks = torch.searchsorted(self._cumulative, uniforms * self._cumulative[-1], right=True)
        return picks.clamp_max(self._last_drawable).tolist()

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        generators = [_generator(self.seed, epoch, 1 + i) for i in range(len(self.sizes))]
        streams: list[list[int]] = [[] for _ in self.sizes]
        positions = [0] * len(self.sizes)
        batches = []
        for source in self.source_order(epoch):
            batch = []
            while len(batch) < self.batch_size:
                if positions[source] == len(streams[source]):  # (re)shuffle a used-up source
                    streams[source] = torch.randperm(self.sizes[source], generator=generators[source]).tolist()
                    positions[source] = 0
                batch.append(self.offsets[source] + streams[source][positions[source]])
                positions[source] += 1
            batches.append((source, batch))
        return batches

    def _full_epoch_counts(self, epochs: int) -> torch.Tensor:
        done, counts = self._tally
        if epochs < done:
            done, counts = 0, torch.zeros(len(self.sizes), dtype=torch.long)
        counts = counts.clone()
        for epoch in range(done, epochs):
            counts += torch.bincount(torch.tensor(self.source_order(epoch), dtype=torch.long),
                                     minlength=len(self.sizes))
        self._tally = (epochs, counts)
        return counts


def make_sampler(mode: str, sizes: list[int], probabilities: list[float], batch_size: int, seed: int = 0,
                 names: list[str] | None = None) -> _SourceMixSampler:
    """The sampler of a `--mixing` mode."""
    if mode == "official":
        return OfficialMixSampler(sizes, probabilities, batch_size, seed, names)
    if mode == "paper":
        return PaperMixSampler(sizes, probabilities, batch_size, seed, names)
    raise ValueError(f"unknown mixing mode {mode!r}; expected one of {MIXING_MODES}")


def concat(datasets) -> ConcatDataset:
    return ConcatDataset(datasets)


class RankSlice(Sampler[list[int]]):
    """One process's share of every global batch: rank r of W takes items [r·B, (r+1)·B) of each batch of W·B.

    The global batches (and so the mixture, the epoch length and a resume's position) do not depend on how many
    processes share them, so W processes × B images see exactly what 1 process × W·B images would, each sample of an
    epoch on exactly one rank."""

    def __init__(self, sampler: _SourceMixSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if sampler.batch_size % world_size:
            raise ValueError(f"a global batch of {sampler.batch_size} does not split over {world_size} processes")
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size
        self.batch_size = sampler.batch_size // world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        lo = self.rank * self.batch_size
        for batch in self.sampler:
            yield batch[lo:lo + self.batch_size]

    def __getattr__(self, name):  # expected_shares, running_shares, names, ... of the global sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)
