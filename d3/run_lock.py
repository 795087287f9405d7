"""One training run per output folder.

Two runs started on the same `--output_dir` overwrite each other's checkpoints (and the second one's start-up
cleanup deletes the first one's half-written `.checkpoint-N.tmp`). The main process of a run therefore holds an
exclusive `flock` on `OUTPUT_DIR/.d3-train.lock` for as long as the run lives; the file names the holder (pid and
host) so that a refused run can say who is in the way. The operating system drops the lock when the holding process
ends, however it ends (SIGKILL included), so a killed run never leaves the folder locked; the file itself stays and
is harmless.

`flock` locks are advisory and local to one machine's kernel; on some network file systems they are not shared
between machines (two nodes writing into one NFS folder are not protected). POSIX only (uses `fcntl`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import weakref
from pathlib import Path

LOCK_NAME = ".d3-train.lock"

# The locks this process holds, by resolved folder: a second train() in the same process on the same folder (a test,
# a notebook, a resume right after a failed call whose traceback still pins the first lock) re-uses the lock instead
# of refusing itself. Weak values: a lock nobody references is released.
_held: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()


class RunLockBusy(RuntimeError):
    """The folder's lock is held by another process."""

    def __init__(self, output_dir: Path, pid: str, host: str):
        self.output_dir, self.pid, self.host = output_dir, pid, host
        super().__init__(f"error: {output_dir} is in use by another training run (pid {pid} on {host}); wait for it "
                         "or pass another --output_dir")


class RunLock:
    """An exclusive lock on one output folder; released by `release()`, when garbage-collected, or at process exit."""

    def __init__(self, output_dir: Path, fd: int):
        self.output_dir = output_dir
        self.path = output_dir / LOCK_NAME
        self._fd = fd
        self._finalizer = weakref.finalize(self, _close, fd)

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()  # unlock and close once; later calls do nothing

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _close(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(path: Path) -> tuple[str, str]:
    """The pid and host written by the holder; it writes them right after locking, so retry a moment if empty."""
    for _ in range(20):
        try:
            fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        except OSError:
            fields = {}
        if fields.get("pid"):
            return fields["pid"], fields.get("host", "?")
        time.sleep(0.05)
    return "?", "?"


def acquire(output_dir: str | os.PathLike) -> RunLock:
    """Lock `output_dir` (created if missing) for this process, or raise RunLockBusy naming the holder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    key = str(output_dir.resolve())
    mine = _held.get(key)
    if mine is not None and mine.held:
        return mine
    path = output_dir / LOCK_NAME
    # O_RDWR without O_TRUNC: opening must not erase the holder's pid before we know whether we got the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockBusy(output_dir, *_read_holder(path)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode())
    lock = RunLock(output_dir, fd)
    _held[key] = lock
    return lock


def lock_output_dir(output_dir: str | os.PathLike, is_main_process: bool = True) -> RunLock | None:
    """For train(): on the main process, lock the folder or stop with the one-line error (SystemExit); on the other
    processes of a multi-process run do nothing (they share the main process's run). Keep the returned object
    referenced for the run's lifetime: dropping it releases the lock."""
    if not is_main_process:
        return None
    try:
        return acquire(output_dir)
    except RunLockBusy as err:
        raise SystemExit(str(err)) from None
