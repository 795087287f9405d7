"""One training run per --output_dir: a second run on a folder in use stops at once naming the holder; the lock dies
with its process (SIGKILL included); train() checks it before loading anything and lets it go when it returns."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from d3.run_lock import LOCK_NAME, RunLockBusy, acquire, lock_output_dir

ROOT = Path(__file__).resolve().parents[1]

HOLDER = ("import sys, time\n"
          "from d3.run_lock import acquire\n"
          "lock = acquire(sys.argv[1])\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")


def hold(folder: Path) -> subprocess.Popen:
    """Another process that takes the lock on `folder` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read() if proc.poll() is not None else line
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def can_lock_elsewhere(folder: Path) -> bool:
    """Whether a fresh process gets the lock right now."""
    code = ("import sys\nfrom d3.run_lock import acquire, RunLockBusy\n"
            "try:\n    acquire(sys.argv[1])\nexcept RunLockBusy:\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode == 0


def test_a_second_run_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path):
    folder = tmp_path / "not" / "yet" / "there"  # created by the lock
    holder = hold(folder)
    try:
        assert (folder / LOCK_NAME).is_file()
        with pytest.raises(SystemExit) as info:
            lock_output_dir(folder)
        message = str(info.value)
        assert message == (f"error: {folder} is in use by another training run (pid {holder.pid} on "
                           f"{socket.gethostname()}); wait for it or pass another --output_dir")
        assert "\n" not in message
        assert not can_lock_elsewhere(folder)
    finally:
        kill(holder)
    # The OS dropped the killed holder's lock: nothing is left stuck, and the new holder's pid replaces the old one.
    lock = acquire(folder)
    try:
        assert (folder / LOCK_NAME).read_text() == f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
        assert not can_lock_elsewhere(folder)
    finally:
        lock.release()
    assert can_lock_elsewhere(folder)


@pytest.mark.quick
def test_the_lock_is_released_explicitly_when_dropped_and_reentrant_in_one_process(tmp_path):
    lock = acquire(tmp_path)
    assert acquire(tmp_path) is lock  # the same process asking again (a second train() call) is not refused
    assert lock_output_dir(tmp_path, is_main_process=False) is None  # other ranks take no lock
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and can_lock_elsewhere(tmp_path)
    lock = acquire(tmp_path)
    del lock  # garbage: released (train() relies on this when it returns)
    assert can_lock_elsewhere(tmp_path)


@pytest.mark.quick
def test_busy_error_names_an_unknown_holder_when_the_file_is_empty(tmp_path, monkeypatch):
    import d3.run_lock as run_lock

    monkeypatch.setattr(run_lock.time, "sleep", lambda _: None)
    assert run_lock._read_holder(tmp_path / "missing") == ("?", "?")
    assert "pid ? on ?" in str(RunLockBusy(tmp_path, "?", "?"))


def test_train_refuses_a_folder_in_use_before_loading_anything(tiny_backbone_dir, synthetic_train_dir, tmp_path,
                                                               monkeypatch, one_thread):
    import train_depth
    import d3.training_setup as training_setup
    from d3.training import build_parser, train

    out = tmp_path / "run"
    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "1",
        "--lr_warmup_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none"])
    holder = hold(out)
    try:
        real_load = training_setup.load_backbone

        def no_load(*a, **k):
            raise AssertionError("train() loaded the backbone before checking the output folder's lock")

        monkeypatch.setattr(training_setup, "load_backbone", no_load)
        with pytest.raises(SystemExit, match=rf"in use by another training run \(pid {holder.pid} on "):
            train(args, train_depth.RECIPE)
        monkeypatch.setattr(training_setup, "load_backbone", real_load)
    finally:
        kill(holder)
    result = train(args, train_depth.RECIPE)  # the holder is gone: the same arguments now train
    assert (result.output_dir / "d3_config.json").is_file()
    assert can_lock_elsewhere(out)  # train() returned: its lock is released
