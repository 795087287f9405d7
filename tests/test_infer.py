"""infer.py on real-world files: formats, odd sizes, one output set per image at its exact size, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "nested").mkdir()
    sizes = {}
    def save(name, arr, **kw):
        Image.fromarray(arr).save(folder / name, **kw)
        sizes[name] = arr.shape[:2]
    save("photo.jpg", rng.integers(0, 255, (211, 317, 3), dtype=np.uint8), quality=90)
    save("plain.png", rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    save("gray.png", rng.integers(0, 255, (40, 70), dtype=np.uint8))
    save("nested/rgba.png", rng.integers(0, 255, (33, 65, 4), dtype=np.uint8))
    return sizes


def run_infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_every_image_gets_its_outputs_at_its_exact_size_and_runs_are_byte_identical(tmp_path, tiny_depth_checkpoint):
    sizes = make_images(tmp_path / "in")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = run_infer("--input", str(tmp_path / "in"), "--checkpoint", str(tiny_depth_checkpoint),
                         "--output", str(out), "--processing_res", "64", "--batch_size", "2")
        assert proc.returncode == 0, proc.stderr
        assert "4 written" in proc.stdout
        outs.append(out)
    for name, (h, w) in sizes.items():
        stem = Path(name).with_suffix("")
        depth = np.load(outs[0] / f"{stem}_depth.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert 0.0 <= depth.min() and depth.max() <= 1.0
        png16 = np.asarray(Image.open(outs[0] / f"{stem}_depth_16bit.png"))
        assert png16.shape == (h, w) and png16.dtype == np.uint16
        np.testing.assert_array_equal(png16, np.round(depth * 65535).astype(np.uint16))
        assert np.asarray(Image.open(outs[0] / f"{stem}_depth_colored.png")).shape == (h, w, 3)
    files_a = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 3 * len(sizes)
    for rel in files_a:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_single_file_input_and_batching_do_not_change_results(tmp_path, tiny_depth_checkpoint):
    make_images(tmp_path / "in")
    single = run_infer("--input", str(tmp_path / "in" / "photo.jpg"), "--checkpoint", str(tiny_depth_checkpoint),
                       "--output", str(tmp_path / "one"), "--processing_res", "64")
    assert single.returncode == 0, single.stderr
    batched = run_infer("--input", str(tmp_path / "in"), "--checkpoint", str(tiny_depth_checkpoint),
                        "--output", str(tmp_path / "all"), "--processing_res", "64", "--batch_size", "4")
    assert batched.returncode == 0, batched.stderr
    a = np.load(tmp_path / "one" / "photo_depth.npy")
    b = np.load(tmp_path / "all" / "photo_depth.npy")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_without_threads_the_outputs_are_the_same_and_a_bad_file_is_still_only_its_own_failure(tmp_path,
                                                                                               tiny_depth_checkpoint):
    """--workers 0 reads and writes in the model's thread (for a CPU the model keeps busy): same files, byte for
    byte, as with reader and writer threads, and an unreadable image fails alone."""
    make_images(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        proc = run_infer("--input", str(tmp_path / "in"), "--checkpoint", str(tiny_depth_checkpoint), "--output",
                         str(out), "--processing_res", "64", "--batch_size", "2", "--workers", workers)
        assert proc.returncode == 1, proc.stderr
        assert f"failed: {tmp_path / 'in' / 'broken.jpg'}:" in proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith("4 written, 0 skipped (already done), 1 failed")
        runs[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(runs["0"]) == 4 * 3 and runs["0"] == runs["2"]
