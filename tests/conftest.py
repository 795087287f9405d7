"""Session fixtures: a tiny SD-style backbone and checkpoints built offline, synthetic scenes on disk.

Everything goes through the real loading code (`load_backbone`, `D3Predictor.from_pretrained`), on folders that
`d3/tiny.py` writes, because no weights can be downloaded here.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of waiting on a network that is not there


def _threads_for_tests() -> int:
    """CPU threads per test process: D3_TEST_THREADS, else 1.

    The suite's models are tiny, and its machines are shared: with several threads per process, on two cores that
    other jobs also use, the threads wait on each other and the suite took 3-5x longer (docs/testing.md). One thread
    keeps its time close to the idle time. D3_TEST_THREADS=2 suits an idle machine."""
    value = os.environ.get("D3_TEST_THREADS", "1")
    try:
        threads = int(value)
    except ValueError:
        raise pytest.UsageError(f"D3_TEST_THREADS={value!r}: expected a positive integer") from None
    if threads < 1:
        raise pytest.UsageError(f"D3_TEST_THREADS={value!r}: expected a positive integer")
    return threads


THREADS = _threads_for_tests()
torch.set_num_threads(THREADS)
# The processes the tests start (infer.py, accelerate launch, drivers) inherit the same limit: OpenMP, MKL and
# OpenBLAS read these at start-up, and torch takes its default thread count from OMP_NUM_THREADS.
os.environ["D3_TEST_THREADS"] = str(THREADS)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)


@contextmanager
def torch_threads(n: int):
    """Run with `n` intra-op threads, then restore. Tests of tiny models use one: on a shared, oversubscribed CPU two
    threads wait on each other and a tiny-model step was measured 3-6x slower than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """The same for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread_per_module")`)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from d3.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-sd") / "backbone")


def _checkpoint(tmp_path_factory, backbone: Path, task: str) -> Path:
    from d3.predictor import predictor_from_backbone

    path = tmp_path_factory.mktemp(f"ckpt-{task}") / task
    predictor_from_backbone(backbone, task, device="cpu", processing_res=64).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_depth_checkpoint(tmp_path_factory, tiny_backbone_dir) -> Path:
    return _checkpoint(tmp_path_factory, tiny_backbone_dir, "depth")


@pytest.fixture(scope="session")
def tiny_normal_checkpoint(tmp_path_factory, tiny_backbone_dir) -> Path:
    return _checkpoint(tmp_path_factory, tiny_backbone_dir, "normal")


@pytest.fixture(scope="session")
def tiny_matting_checkpoint(tmp_path_factory, tiny_backbone_dir) -> Path:
    return _checkpoint(tmp_path_factory, tiny_backbone_dir, "matting")


@pytest.fixture(scope="session")
def synthetic_train_dir(tmp_path_factory) -> Path:
    from d3.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "train", 64, 64, 64, seed=0)
