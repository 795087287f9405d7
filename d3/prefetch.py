"""Keep the accelerator busy during inference: read and decode images ahead, write outputs behind.

A folder of JPEGs costs milliseconds of CPU work per image (decode, convert, resize; then colour-map, PNG-encode and
write three files) next to a one-step model that takes about as long on a GPU. Done in sequence the GPU waits for
the CPU half the time. Here, reader threads decode and pre-process upcoming images while the model runs, and writer
threads encode and write finished predictions, so the model's pace sets the throughput. PIL, zlib and torch release
the GIL in their heavy loops, so threads are enough (no process pool, no pickling of arrays).

Images of the same network input size are batched together (`--batch_size`); the model is launched on a batch before
the previous batch's results are copied back, so the device never waits for Python between batches.

With `workers=0` reading and writing happen in the calling thread, between model calls: on a CPU whose cores the
model already keeps busy, extra threads have nothing to hide and only compete with the model's own threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .flags import default_workers


class InlineExecutor:
    """The `concurrent.futures` executor interface, running each call at once in the caller's thread (workers=0)."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # handed to whoever asks for the result, as a thread pool would
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        pass


def executor(workers: int, name: str) -> ThreadPoolExecutor | InlineExecutor:
    """`workers` threads, or none at all (0): the work runs in the calling thread."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name) if workers > 0 else InlineExecutor()


def ordered_prefetch(items: Iterable[Any], fn: Callable[[Any], Any], workers: int, ahead: int) -> Iterator[tuple]:
    """Yield (item, result, error) in input order, computing `fn(item)` in `workers` threads (0: in this one, when
    the item is reached), at most `ahead` early.

    A failing item yields its exception instead of a result, so one bad file never stops the others. Bounded
    look-ahead keeps memory flat however long the folder is.
    """
    ahead = max(1, ahead) if workers > 0 else 1

    def guarded(item):
        try:
            return fn(item), None
        except Exception as err:  # reported per item by the caller
            return None, err

    with executor(workers, "d3-read") as pool:
        queue: deque[tuple[Any, Future]] = deque()
        iterator = iter(items)
        for item in iterator:
            queue.append((item, pool.submit(guarded, item)))
            if len(queue) >= ahead:
                break
        while queue:
            item, future = queue.popleft()
            result, error = future.result()
            nxt = next(iterator, _END)
            if nxt is not _END:
                queue.append((nxt, pool.submit(guarded, nxt)))
            yield item, result, error


_END = object()


class BackgroundWriter:
    """Runs write jobs in threads; at most `max_pending` are queued, so finished predictions cannot pile up in memory.

    Results are reported in the calling thread, in submission order: `on_done(key)` after a job succeeded,
    `on_error(key, err)` for a job that raised one of `expected` (a full disk or a read-only folder is that file's
    failure); anything else is re-raised, since it is a bug.
    """

    def __init__(self, workers: int, on_done: Callable[[Any], None], on_error: Callable[[Any, BaseException], None],
                 max_pending: int | None = None, expected: tuple = (OSError,)):
        self._pool = executor(workers, "d3-write")
        self._pending: deque[tuple[Any, Future]] = deque()
        self.max_pending = max_pending or 4 * max(1, workers)
        self.on_done, self.on_error, self.expected = on_done, on_error, expected

    def submit(self, key: Any, fn: Callable, *args) -> None:
        while len(self._pending) >= self.max_pending:
            self._collect(*self._pending.popleft())
        self._pending.append((key, self._pool.submit(fn, *args)))

    def _collect(self, key: Any, future: Future) -> None:
        try:
            future.result()
        except self.expected as err:
            self.on_error(key, err)
        else:
            self.on_done(key)

    def close(self) -> None:
        try:
            while self._pending:
                self._collect(*self._pending.popleft())
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Prepared:
    path: Path
    key: Any
    image: np.ndarray | None
    x: torch.Tensor
    undo: tuple


@dataclass
class _InFlight:
    """A launched batch: its members and their outputs, on their way to host memory."""

    members: list[_Prepared]
    outputs: list[torch.Tensor]
    ready: Any = None  # a CUDA event when the copies are asynchronous

    def arrays(self) -> list[np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        return [o.numpy() for o in self.outputs]


def _launch(predictor, members: list[_Prepared], pad_to: int) -> _InFlight:
    """Run the model on a batch and start copying its outputs back, without waiting for either."""
    xs = [m.x for m in members]
    if len(xs) < pad_to:  # a compiled model keeps one graph per bucket: pad the last batch instead of recompiling
        xs += [xs[-1]] * (pad_to - len(xs))
    device = torch.device(getattr(predictor, "device", "cpu"))
    if device.type == "cuda":
        # Pinned memory and an asynchronous copy: a pageable copy would wait for the previous batch's kernels,
        # leaving the GPU idle while this batch is copied and its first kernels are launched.
        batch = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=True)
        batch = torch.stack(xs, out=batch).to(device, non_blocking=True)
    else:
        batch = torch.stack(xs)
    decoded = predictor.predict_tensor(batch)
    outputs = [predictor.postprocess_tensor(d, m.undo) for d, m in zip(decoded, members)]
    if device.type != "cuda":
        return _InFlight(members, [o.cpu() for o in outputs])
    host = []
    for o in outputs:
        buffer = torch.empty(o.shape, dtype=o.dtype, pin_memory=True)  # from torch's caching host allocator
        buffer.copy_(o, non_blocking=True)
        host.append(buffer)
    # On the model's device's stream: a bare record() goes on the *current* device's stream (cuda:0 unless set),
    # which holds none of cuda:K's copies, so the event would be complete at once and the buffers read too early.
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return _InFlight(members, host, event)


def _reason(err: BaseException) -> str:
    if hasattr(err, "reason"):  # d3.io.ImageReadError
        return err.reason
    first = str(err).splitlines()[0] if str(err) else ""
    return f"prediction failed ({type(err).__name__}: {first})"


# Per-file failures: unreadable images, images too large for memory, a model error on one batch.
FILE_ERRORS = (ValueError, RuntimeError, MemoryError)


def predict_files(
    predictor,
    jobs: Iterable[tuple[Path, Any]],
    read: Callable[[Path], np.ndarray],
    write: Callable[[Any, np.ndarray, np.ndarray], None],
    fail: Callable[[Path, str], None],
    *,
    processing_res: int | None = None,
    resize_mode: str | None = None,
    batch_size: int = 1,
    workers: int | None = None,
    on_written: Callable[[Path], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    needs_image: bool = True,
) -> None:
    """Predict every (path, key) job: `read(path)` -> uint8 RGB and pre-processing in reader threads, the model on
    batches of one input size, `write(key, prediction, image)` in writer threads (`workers=0`: no threads, each
    step in turn; None: `default_workers` for the predictor's device, 0 on the CPU).

    Every failure is reported once through `fail(path, reason)` and the other files go on: a file that cannot be
    read or pre-processed, a batch whose prediction fails (its images are retried one by one, so only the image at
    fault is reported), an output that cannot be written (OSError or ValueError). `needs_image=False` lets the
    input image go as soon as it is pre-processed (`write` then gets None): only a matting cut-out needs it.
    """
    device_type = torch.device(getattr(predictor, "device", "cpu")).type
    workers = default_workers(device_type) if workers is None else max(0, workers)
    batch_size = max(1, batch_size)
    res = predictor.config.processing_res if processing_res is None else processing_res
    mode = resize_mode or predictor.config.resize_mode
    pad_to = batch_size if getattr(predictor, "compiled", False) else 0
    progress = on_progress or (lambda n: None)

    def prepare(job):
        image = read(job[0])
        x, undo = predictor.preprocess(image, res, mode)
        return _Prepared(job[0], job[1], image if needs_image else None, x, undo)

    def launch(members: list[_Prepared], pad: int) -> list[_InFlight]:
        try:
            return [_launch(predictor, members, pad)]
        except FILE_ERRORS as err:  # e.g. out of memory on a batch of huge images
            if len(members) == 1:
                fail(members[0].path, _reason(err))
                progress(1)
                return []
        return [flight for m in members for flight in launch([m], 0)]

    def finish(flight: _InFlight) -> None:
        for member, prediction in zip(flight.members, flight.arrays()):
            writer.submit(member, write, member.key, prediction, member.image)
        progress(len(flight.members))

    buckets: dict[tuple, list[_Prepared]] = {}
    held = 0
    max_held = 4 * batch_size  # images of mixed sizes wait for batch-mates of their size, but not without bound
    in_flight: list[_InFlight] = []
    with BackgroundWriter(workers, on_done=lambda m: on_written and on_written(m.path),
                          on_error=lambda m, err: fail(m.path, f"cannot write outputs ({err})"),
                          max_pending=2 * workers + batch_size, expected=(OSError, ValueError)) as writer:

        def run(members: list[_Prepared]) -> None:
            nonlocal in_flight
            launched = launch(members, pad_to)
            for flight in in_flight:  # the previous batch is copied back and written while this one computes
                finish(flight)
            in_flight = launched

        for job, prepared, error in ordered_prefetch(jobs, prepare, workers, ahead=2 * batch_size + workers):
            if error is not None:
                if not isinstance(error, FILE_ERRORS):
                    raise error
                fail(job[0], _reason(error))
                progress(1)
                continue
            key = tuple(prepared.x.shape[-2:])
            buckets.setdefault(key, []).append(prepared)
            held += 1
            if len(buckets[key]) < batch_size:
                if held < max_held:
                    continue
                key = max(buckets, key=lambda k: len(buckets[k]))
            members = buckets.pop(key)
            held -= len(members)
            run(members)
        for members in list(buckets.values()):
            run(members)
        for flight in in_flight:
            finish(flight)
