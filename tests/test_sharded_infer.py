"""`torchrun --nproc_per_node N infer.py`: process r of N takes the sorted files r::N; the outputs are byte for byte
those of one process; one summary line counts every process; --skip_existing works per process; a failure in any
process makes the run's exit status non-zero."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3.sharding import Shard

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(\d+) written, (\d+) skipped \(already done\), (\d+) failed -> ", re.MULTILINE)


def make_images(folder: Path, n: int = 6) -> list[str]:
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"img{i}.png" if i % 3 else f"sub/img{i}.png"  # a nested folder too; odd sizes
        Image.fromarray(rng.integers(0, 255, (24 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
    return {**clean, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(free_port())] if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, str(ROOT / "infer.py"), *args, "--processing_res", "64", "--workers", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summaries(proc: subprocess.CompletedProcess) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups())) for m in SUMMARY.finditer(proc.stdout)]


def test_shard_from_env_and_split():
    shards = [Shard.from_env({"RANK": str(r), "WORLD_SIZE": "3"}) for r in range(3)]
    owned = [[i for i in range(8) if s.owns(i)] for s in shards]
    assert owned == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Shard.from_env({}) == Shard(0, 1, 0) and not Shard.from_env({}).sharded
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}).local_rank == 0
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_torchrun_two_processes_equal_one_and_skip_existing_recomputes_nothing(tmp_path, tiny_depth_checkpoint):
    make_images(tmp_path / "in")
    common = ["--input", str(tmp_path / "in"), "--checkpoint", str(tiny_depth_checkpoint)]
    one = infer(*common, "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert summaries(one) == [(6, 0, 0)]

    two = infer(*common, "--output", str(tmp_path / "two"), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert summaries(two) == [(6, 0, 0)], two.stdout  # one line, printed once, with both processes' counts
    expected = files_of(tmp_path / "one")
    assert len(expected) == 6 * 3 and files_of(tmp_path / "two") == expected  # byte-identical, nothing else written

    # Again with --skip_existing, plus one unreadable file that falls to rank 1 (sorted position 3 of 7).
    (tmp_path / "in" / "img4b.png").write_bytes(b"not a png")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*") if p.is_file()}
    again = infer(*common, "--output", str(tmp_path / "two"), "--skip_existing", processes=2)
    assert again.returncode != 0, again.stdout  # a failure in rank 1 fails the run
    assert summaries(again) == [(0, 6, 1)], again.stdout + again.stderr[-3000:]
    assert "img4b.png" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed or rewritten
    assert files_of(tmp_path / "two") == expected


def test_rank_and_world_size_without_a_launcher_split_and_report_per_process(tmp_path, tiny_depth_checkpoint):
    """Processes started by hand (a batch-array job): RANK/WORLD_SIZE only, no rendezvous; each one its share."""
    names = make_images(tmp_path / "in", n=3)
    ordered = sorted(names, key=lambda n: tuple((tmp_path / "in" / n).parts))
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--input", str(tmp_path / "in"), "--checkpoint",
                           str(tiny_depth_checkpoint), "--output", str(tmp_path / "out"), "--processing_res", "64",
                           "--workers", "1"], capture_output=True, text=True, cwd=ROOT,
                          env={**env(), "RANK": "1", "WORLD_SIZE": "2"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("rank 1 of 2: 1 written, 0 skipped (already done), 0 "
                                                             "failed -> ")
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*_depth.npy"))
    assert written == [str(Path(ordered[1]).with_suffix("")) + "_depth.npy"]


@pytest.mark.quick
def test_collect_under_nccl_reuses_one_gloo_side_group(monkeypatch):
    """Under NCCL, `Shard.collect` gathers pickled records over a gloo side group. A run that validates every few
    hundred steps calls it hundreds of times: one group must serve them all (each new group keeps a socket per peer
    open until the process ends). A 1-process gloo group stands in, with its backend reported as NCCL."""
    import socket

    import torch.distributed as dist

    from d3 import sharding

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        made = []
        real_new_group = dist.new_group
        monkeypatch.setattr(dist, "new_group", lambda *a, **k: made.append(1) or real_new_group(*a, **k))
        monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
        shard = Shard(0, 1, 0)
        assert [shard.collect(i, lambda records: sum(records) + 1) for i in range(5)] == [1, 2, 3, 4, 5]
        assert len(made) == 1
    finally:
        dist.destroy_process_group()
        sharding._side_group[:] = [None, None]
