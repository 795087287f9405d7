"""Shared benchmark machinery: backbones built once into a cache, the device in words, wall-clock timing that waits
for the accelerator, peak memory per measured side, FLOP counts, and the printed table.

Memory is measured differently per device, and every printed figure says which:
- CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the allocator's cache), reset before each side;
- CPU: the process's resident set size, sampled every 2 ms from /proc/self/statm while a side runs, minus the RSS
  before the first measured step (so loaded libraries do not dilute the ratio). `resource.getrusage` keeps only the
  process-wide maximum, which cannot be reset between the two sides of one run; it is printed as well, for reference.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package and the recipes at the repository root, without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("D3_BENCH_CACHE", Path.home() / ".cache" / "d3-benchmarks"))

# Dense bf16 tensor-core peak used for "ms per image at the physical limit" (the figure for the H100).
PEAK_TFLOPS = {"H100": 790.0}


# ------------------------------------------------------------------------------------------------ backbones
def ensure_backbone(preset: str, cache_dir: Path = DEFAULT_CACHE, backbone_dir: str | None = None) -> Path:
    """A diffusers SD-style folder: `backbone_dir` if given (e.g. the real SD 2.1), else a random-init one of
    `preset` built once into `cache_dir/backbone-<preset>` (the sd21 one takes a few minutes and ~5 GB)."""
    if backbone_dir:
        return Path(backbone_dir)
    from d3.tiny import build_tiny_backbone

    path = Path(cache_dir) / f"backbone-{preset}"
    if (path / "model_index.json").exists():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the {preset} backbone into {path} (once) ...", flush=True)
    build_tiny_backbone(tmp, preset=preset)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def default_resolution(backbone: str) -> int:
    return 768 if backbone == "sd21" else 64


# ---------------------------------------------------------------------------------------------------- device
def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores, torch {torch.__version__}"


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(num_threads: int | None) -> None:
    """On a shared CPU, several intra-op threads per process thrash; `--num_threads 1` gives stable timings."""
    if num_threads:
        torch.set_num_threads(num_threads)


# ---------------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so that one side's leftovers do not count in the next side's RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_baseline(device: torch.device) -> int:
    """What a side's peak is measured above: 0 on CUDA (tensors only), the trimmed RSS now on the CPU."""
    if device.type == "cuda":
        return 0
    _release_freed_memory()
    return _rss_bytes() or 0


def process_max_rss() -> int:
    """resource.getrusage's lifetime maximum RSS of this process, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory of one side over all the blocks it is measured in (`with meter:` once per block)."""

    def __init__(self, device: torch.device, baseline: int | None = None):
        self.device = device
        self.baseline = baseline if baseline is not None else memory_baseline(device)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "peak GPU memory (torch.cuda.max_memory_allocated)"
        return "peak RSS above the pre-run baseline (sampled /proc/self/statm)"

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss - self.baseline)
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


def attention_kind(model: torch.nn.Module) -> str:
    """Which attention the model runs: diffusers' AttnProcessor2_0 is torch's fused scaled_dot_product_attention."""
    processors = getattr(model, "attn_processors", None)
    if not processors:
        return "n/a"
    names = sorted({type(p).__name__ for p in processors.values()})
    fused = all(n in ("AttnProcessor2_0", "FluxAttnProcessor", "JointAttnProcessor2_0") for n in names)
    return ", ".join(names) + (" (fused F.scaled_dot_product_attention)" if fused else "")


def goal_lines(applies: bool, checks: list[tuple[str, float | None, str, float]]) -> list[str]:
    """The issue's targets, judged only where they are defined (SD 2.1 size, 768², an H100); else marked n/a."""
    out = []
    for name, value, op, target in checks:
        if value is None or not applies:
            verdict = "n/a here (judged for --backbone sd21 --resolution 768 on an H100)"
        else:
            ok = value <= target if op == "<=" else value >= target
            verdict = f"{value:.3g} {'meets' if ok else 'MISSES'} {op} {target:g}"
        out.append(f"goal: {name}: {verdict}")
    return out


def gib(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------------- timing
def time_block(fn: Callable[[], object], iterations: int, device: torch.device) -> float:
    """Seconds for `iterations` calls of `fn`, waiting for the device before and after (kernels run asynchronously)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls, convolutions, attention; forward and backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------------------------------ table
@dataclass
class Row:
    side: str
    seconds: float | None  # wall time of the measured images
    images: int
    peak_bytes: float | None
    note: str = ""

    @property
    def ms_per_image(self) -> float | None:
        return None if self.seconds is None else 1000 * self.seconds / self.images

    @property
    def images_per_s(self) -> float | None:
        return None if not self.seconds else self.images / self.seconds


def print_table(title: str, device: str, setting: dict[str, object], rows: list[Row], ratios: dict[str, str],
                memory_label: str, extra: list[str] = ()) -> None:
    """The human-readable result and a markdown table whose rows can go into the README as they are."""
    print(f"\n== {title} ==")
    print(f"device: {device}")
    for key, value in setting.items():
        print(f"{key}: {value}")
    print(f"memory: {memory_label}")
    head = "| side | device | precision | resolution | batch | ms / image | images / s | peak memory | note |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    short = device.split(",")[0]
    for r in rows:
        ms = "OOM" if r.seconds is None else f"{r.ms_per_image:.1f}"
        ips = "OOM" if r.seconds is None else f"{r.images_per_s:.2f}"
        print(f"| {r.side} | {short} | {setting.get('precision', '')} | {setting.get('resolution', '')} | "
              f"{setting.get('batch size', '')} | {ms} | {ips} | {gib(r.peak_bytes)} | {r.note} |")
    for key, value in ratios.items():
        print(f"{key}: {value}")
    for line in extra:
        print(line)
    print(f"process max RSS (resource.getrusage, whole run): {gib(process_max_rss())}")
