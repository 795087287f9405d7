"""Mixed sampling over several training sources (paper appendix 6.3).

Each batch comes from ONE source, drawn with the given probabilities (Marigold's mixed batch sampler), so sources of
different image statistics are never blended inside a batch. The order depends only on (seed, epoch): a resumed run
replays exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset, Sampler


def parse_dataset_spec(spec: str) -> tuple[str, float | None]:
    """'PATH[:PROB]' -> (path, prob or None). A Windows drive letter or a ':' inside the path is left alone."""
    path, sep, prob = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(prob)
        except ValueError:
            pass
    return spec, None


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


class MixedBatchSampler(Sampler[list[int]]):
    """Yields batches of indices into `ConcatDataset(datasets)`, each batch from one source."""

    def __init__(self, sizes: list[int], probabilities: list[float], batch_size: int, seed: int = 0):
        if len(sizes) != len(probabilities) or not sizes:
            raise ValueError("one probability per source is needed")
        self.sizes = list(sizes)
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, sum(max(1, s // self.batch_size) for s, p in zip(self.sizes, self.probabilities) if p > 0))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        streams = [torch.randperm(s, generator=g).tolist() for s in self.sizes]
        positions = [0] * len(self.sizes)
        for _ in range(len(self)):
            source = int(torch.multinomial(self.probabilities, 1, generator=g))
            batch = []
            while len(batch) < self.batch_size:
                if positions[source] == len(streams[source]):
                    streams[source] = torch.randperm(self.sizes[source], generator=g).tolist()
                    positions[source] = 0
                batch.append(self.offsets[source] + streams[source][positions[source]])
                positions[source] += 1
            yield batch


def concat(datasets) -> ConcatDataset:
    return ConcatDataset(datasets)
