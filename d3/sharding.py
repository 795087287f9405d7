"""Split inference over several processes: `torchrun --nproc_per_node N infer.py ...` (or `accelerate launch
--num_processes N infer.py ...`, which starts the processes the same way).

Each process reads its place from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) and takes every N-th
file of the sorted list, starting at its rank: the split needs no communication. Only the final summary does: when
the launcher also set MASTER_ADDR/MASTER_PORT (torchrun does), the counts of all processes are gathered over a gloo
process group opened at the end, so one line gives the totals. Without them (processes started by hand with RANK
and WORLD_SIZE only, say as a batch-array job) each process prints its own share's line.

evaluate.py splits a benchmark's samples the same way (sample i to rank i % N) and sends each process's per-sample
records to rank 0 with `Shard.collect`, which scores the whole set from them and tells every process the outcome.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# How long the first process to finish waits for the slowest one at the final gather. Shares differ by at most one
# file, but not in image sizes; a process that dies instead makes the launcher stop the others.
GATHER_TIMEOUT = timedelta(hours=12)


_side_group: list = [None, None]  # [the default group it was made for, its gloo side group] (`_gloo_side_group`)


def _gloo_side_group():
    """A gloo group over every process of the open default group, for pickled objects on the CPU: None when the
    default group is gloo itself. Made once per default group and reused: a long run calls `Shard.collect` at every
    validation, and each new group holds a socket per peer until the process ends."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if _side_group[0] is not dist.group.WORLD:  # none yet, or made for a default group destroyed since
        _side_group[:] = [dist.group.WORLD, dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT)]
    return _side_group[1]


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Shard:
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process of the run")
        return cls(rank, world_size, int(env.get("LOCAL_RANK", str(rank))))

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether the file at `index` of the sorted list is this process's (files rank::world_size)."""
        return index % self.world_size == self.rank

    def device(self) -> str | None:
        """With several processes on a GPU machine, one GPU per process (LOCAL_RANK); None: the usual default."""
        import torch

        if self.sharded and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return None

    def can_gather(self) -> bool:
        import torch.distributed as dist

        if not (self.sharded and dist.is_available()):
            return False
        if dist.is_initialized():
            return True
        port = os.environ.get("MASTER_PORT", "")
        # MASTER_PORT=0 (torchrun --master_port 0) reaches the processes as is: nothing to connect to
        return bool(os.environ.get("MASTER_ADDR")) and port.isdigit() and int(port) > 0

    def gather(self, counts: tuple[int, ...], report: Callable[[list[tuple[int, ...]]], None]) -> list[tuple[int, ...]]:
        """Every process's `counts`, in rank order (a collective: all processes call it). Rank 0 calls `report` on
        them before any process goes on, so that no process exits (and makes the launcher stop the others) before
        the summary is out. Opens a gloo group from the launcher's environment if none is open, and closes it."""
        import torch.distributed as dist

        opened = not dist.is_initialized()
        if opened:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=GATHER_TIMEOUT)
        try:
            group = None if opened else _gloo_side_group()
            everyone: list = [None] * self.world_size
            dist.all_gather_object(everyone, tuple(counts), group=group)
            everyone = [tuple(c) for c in everyone]
            if self.is_main:
                report(everyone)
            dist.barrier(group=group)
            return everyone
        finally:
            if opened:
                dist.destroy_process_group()

    @contextmanager
    def connected(self) -> Iterator[None]:
        """Keep a gloo process group open for the block, so that several `collect` calls (evaluate.py's all_depth:
        one per dataset) share one rendezvous. Does nothing when one is open already or there is none to make."""
        import torch.distributed as dist

        opened = self.can_gather() and not dist.is_initialized()
        if opened:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=GATHER_TIMEOUT)
        try:
            yield
        finally:
            if opened:
                dist.destroy_process_group()

    def collect(self, record: Any, finish: Callable[[list[Any]], T]) -> T:
        """A collective (all processes call it; needs `can_gather()`): every process's picklable `record` goes to
        rank 0, which calls `finish` on them, in rank order; what `finish` returns (picklable: keep it small) comes
        back on every process. Only rank 0 holds all records. If `finish` raises, rank 0 re-raises it after telling
        the others, which raise `RankZeroFailed` with its message: no process waits for an answer that never comes."""
        import torch.distributed as dist

        with self.connected():
            group = _gloo_side_group()
            everyone: list[Any] | None = [None] * self.world_size if self.is_main else None
            dist.gather_object(record, everyone, dst=0, group=group)
            error: BaseException | None = None
            outcome: list[Any] = [None]
            if self.is_main:
                try:
                    outcome = [("ok", finish(everyone))]
                except Exception as e:  # noqa: BLE001 - told to the others, then raised here
                    error, outcome = e, [("error", str(e))]
            dist.broadcast_object_list(outcome, src=0, group=group)
        if error is not None:
            raise error
        status, value = outcome[0]
        if status == "error":
            raise RankZeroFailed(value)
        return value


class RankZeroFailed(RuntimeError):
    """Raised on the other processes when rank 0's part of `Shard.collect` failed (rank 0 reports the reason)."""
