"""infer.py on the folders users really have: bad files are listed with their reason and the others still processed,
odd formats come out as correct RGB, a killed run leaves no half-written output and resumes with --skip_existing."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer
from d3.io import ImageReadError, atomic_write, load_rgb, save_npy

ROOT = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION = 0x0112


# -- writers of awkward files --------------------------------------------------------------------------------------
def png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one): signature, IHDR (bit depth 16, colour type 2), IDAT, IEND."""
    height, width, _ = rgb16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


def blocks(values: list, size: int = 8) -> np.ndarray:
    """One size×size block per value, side by side (JPEG-friendly: flat 8×8 blocks survive compression)."""
    return np.concatenate([np.broadcast_to(np.asarray(v, np.uint8), (size, size, len(v))) for v in values], axis=1)


CMYK_VALUES = [(0, 0, 0, 0), (0, 0, 0, 128), (255, 0, 0, 0), (0, 128, 255, 64), (40, 80, 120, 200)]


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """The usual naive conversion (no ICC profile): R = (255 - C)(255 - K) / 255, and so on."""
    c = cmyk.astype(np.float64)
    return np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)


def make_messy_folder(folder: Path) -> dict:
    """Every kind of file of the issue; returns the expected RGB (or shape) of the valid ones and the bad ones."""
    rng = np.random.default_rng(0)
    (folder / "nested" / "deeper").mkdir(parents=True)
    expected: dict[str, np.ndarray | tuple] = {}

    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(photo).save(folder / "photo.png")
    expected["photo.png"] = photo

    levels = np.arange(0, 256, 17, dtype=np.uint16)  # 16-bit value k·257 is 8-bit k exactly
    gray16 = np.tile(levels * 257, (4, 1))
    Image.fromarray(gray16).save(folder / "gray16.png")
    expected["gray16.png"] = np.repeat(np.tile(levels.astype(np.uint8), (4, 1))[..., None], 3, axis=2)
    rgb16 = np.stack([gray16, gray16[:, ::-1], np.full_like(gray16, 200 * 257)], axis=-1)
    png16_rgb(folder / "rgb16.png", rgb16)
    expected["rgb16.png"] = (rgb16 // 257).astype(np.uint8)

    cmyk = blocks(CMYK_VALUES)
    Image.frombytes("CMYK", (cmyk.shape[1], cmyk.shape[0]), cmyk.tobytes()).save(folder / "cmyk.jpg", quality=100)
    expected["cmyk.jpg"] = cmyk_to_rgb(cmyk)

    stored = np.zeros((30, 50, 3), np.uint8)  # as stored: 30 rows x 50 columns, a red mark at the top left
    stored[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(folder / "rotated.jpg", quality=95, exif=exif.tobytes())
    expected["rotated.jpg"] = np.rot90(stored, k=-1)  # displayed: 50 rows x 30 columns, the mark at the top right

    Image.fromarray(np.array([[[10, 200, 30]]], np.uint8)).save(folder / "one.png")
    expected["one.png"] = np.array([[[10, 200, 30]]], np.uint8)

    x, y = np.arange(6000, dtype=np.uint16)[None, :], np.arange(4000, dtype=np.uint16)[:, None]
    huge = np.empty((4000, 6000, 3), np.uint8)  # built in place: a smooth 24-megapixel pattern
    huge[..., 0], huge[..., 1], huge[..., 2] = x // 23 % 256, y // 17 % 256, (x + y) // 31 % 256
    Image.fromarray(huge).save(folder / "huge.jpg", quality=80)
    expected["huge.jpg"] = (4000, 6000)
    del huge

    odd = rng.integers(0, 256, (21, 13, 3), dtype=np.uint8)
    Image.fromarray(odd).save(folder / "café_日本 ü.png")
    expected["café_日本 ü.png"] = odd
    Image.fromarray(odd[:8]).save(folder / "nested" / "deeper" / "inner.png")
    expected["nested/deeper/inner.png"] = odd[:8]

    jpeg = folder / "truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "nested" / "notes.png").write_text("not an image, whatever the name says\n")
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    bad = {"truncated.jpg": "image file is truncated", "empty.png": "empty file (0 bytes)",
           "nested/notes.png": "cannot identify image file"}
    return {"expected": expected, "bad": bad}


ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # threads: OMP_NUM_THREADS as tests/conftest.py sets it


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# -- reading: each awkward kind of file, exact values --------------------------------------------------------------
@pytest.mark.quick
def test_load_rgb_converts_every_kind_correctly(tmp_path):
    made = make_messy_folder(tmp_path)
    for name, want in made["expected"].items():
        got = load_rgb(tmp_path / name)
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, name
        if isinstance(want, tuple):
            assert got.shape[:2] == want
        elif name == "rotated.jpg":  # JPEG: compare the mark's position, not the exact bytes
            assert got.shape == want.shape and got[2:8, -8:-2, 0].min() > 200 and got[2:8, 2:8, 0].max() < 60
        elif name == "cmyk.jpg":
            assert np.abs(got.astype(int) - want).max() <= 3, (got[0, ::8], want[0, ::8])
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    for name, reason in made["bad"].items():
        with pytest.raises(ImageReadError) as info:
            load_rgb(tmp_path / name)
        assert info.value.path == tmp_path / name and reason in info.value.reason
        assert str(info.value).startswith(f"{tmp_path / name}: ")


# -- the whole folder through infer.py -----------------------------------------------------------------------------
def test_messy_folder_every_valid_image_gets_outputs_every_bad_file_is_listed(tmp_path, tiny_matting_checkpoint):
    made = make_messy_folder(tmp_path / "in")
    out = tmp_path / "out"
    # run under a wrapper that reports the process's peak memory: the 24-megapixel photo goes through the network at
    # --processing_res 64, so only its full-resolution input and outputs cost memory, never a full-size UNet pass
    wrapper = ("import resource, runpy, sys\nsys.argv = ['infer.py'] + sys.argv[1:]\ncode = 0\n"
               "try:\n    runpy.run_path('infer.py', run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, "--input", str(tmp_path / "in"), "--checkpoint",
                           str(tiny_matting_checkpoint), "--output", str(out), "--processing_res", "64",
                           "--batch_size", "2", "--workers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=ENV)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # every bad file: "failed: <path>: <reason>"; the summary line last on stdout
    failed = dict(re.findall(r"^failed: (.+?): (.+)$", proc.stderr, flags=re.M))
    assert sorted(failed) == sorted(str(tmp_path / "in" / n) for n in made["bad"]), proc.stderr[-3000:]
    for name, reason in made["bad"].items():
        assert reason in failed[str(tmp_path / "in" / name)]
    n_good = len(made["expected"])
    summary = rf"{n_good} written, 0 skipped \(already done\), 3 failed -> {re.escape(str(out))}, [0-9.]+ images/s"
    assert re.fullmatch(summary, proc.stdout.strip().splitlines()[-1]), proc.stdout
    assert "Traceback" not in proc.stderr
    # every valid image: its outputs at its (displayed) size; the cut-out carries the correctly converted RGB
    for name, want in made["expected"].items():
        stem = Path(name).with_suffix("")
        alpha = np.asarray(Image.open(out / f"{stem}_alpha.png"))
        rgba = np.asarray(Image.open(out / f"{stem}_rgba.png"))
        shape = want if isinstance(want, tuple) else want.shape[:2]
        assert alpha.shape == shape and rgba.shape == (*shape, 4), name
        assert np.asarray(Image.open(out / f"{stem}_alpha_16bit.png")).shape == shape
        if name in ("photo.png", "gray16.png", "rgb16.png", "one.png", "café_日本 ü.png", "nested/deeper/inner.png"):
            np.testing.assert_array_equal(rgba[..., :3], want, err_msg=name)
        elif name == "cmyk.jpg":
            assert np.abs(rgba[..., :3].astype(int) - want).max() <= 3
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"], "temporary files left"
    # memory: a 6000x4000 RGB image is 72 MB as uint8 and 288 MB as float; the whole run stays far below what a
    # full-resolution network pass would take (tens of GB for the tiny UNet)
    peak_mb = int(re.search(r"peak_rss_kb (\d+)", proc.stderr).group(1)) / 1024
    print(f"infer.py peak memory with a 6000x4000 image: {peak_mb:.0f} MB")
    assert peak_mb < 2500, f"peak memory {peak_mb:.0f} MB"


# -- usage errors ------------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_missing_path_and_empty_folder_are_one_line_errors(tmp_path, capsys):
    cases = {
        tmp_path / "nowhere": "no such file or folder",
        (tmp_path / "empty"): "no images found",
        (tmp_path / "only-text"): "no images found",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("hello")
    for path, message in cases.items():
        code = infer.main(["--input", str(path), "--checkpoint", str(tmp_path / "no-checkpoint-needed-yet")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --input {path}: {message}"), err
    code = infer.main(["--input", str(tmp_path / "only-text" / "notes.txt"), "--checkpoint", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no such checkpoint folder" in err, err


# -- atomic writes -----------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_a_failed_write_leaves_the_previous_file_or_nothing(tmp_path):
    target = tmp_path / "sub" / "x_depth.npy"

    def crash_midway(tmp: Path) -> None:
        tmp.write_bytes(b"\x93NUMPY partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash_midway)
    assert not target.exists() and list(target.parent.iterdir()) == []
    save_npy(target, np.arange(4.0))
    with pytest.raises(OSError):
        atomic_write(target, crash_midway)
    np.testing.assert_array_equal(np.load(target), np.arange(4.0))  # the previous version, whole
    assert [p.name for p in target.parent.iterdir()] == ["x_depth.npy"]
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask()), "outputs get the usual permissions"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KILLER = """
import os, signal, sys, runpy
sys.path.insert(0, {root!r})
import d3.io as io
real, calls = io.atomic_write, [0]
def atomic_write(path, write):
    calls[0] += 1
    if calls[0] != {kill_at}:
        return real(path, write)
    def write_then_die(tmp):  # the temporary file is complete, the rename has not happened
        write(tmp)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write_then_die)
io.atomic_write = atomic_write
sys.argv = ["infer.py"] + sys.argv[1:]
runpy.run_path({infer!r}, run_name="__main__")
"""


def test_killed_run_leaves_no_partial_output_and_resumes_without_recomputing(tmp_path, tiny_depth_checkpoint, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png", "sub/d.png", "e.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "out"
    common = ["--input", str(images), "--checkpoint", str(tiny_depth_checkpoint), "--output", str(out),
              "--processing_res", "32", "--workers", "1"]
    # depth writes 3 files per image, in sorted order a, b, e, sub/c, sub/d (one writer thread: in that order):
    # die while writing e's second file
    script = KILLER.format(root=str(ROOT), kill_at=8, infer=str(ROOT / "infer.py"))
    killed = subprocess.run([sys.executable, "-c", script, *common], capture_output=True, text=True, cwd=ROOT,
                            timeout=600, env=ENV)
    assert killed.returncode == -9, killed.stderr[-2000:]

    finished = {"a", "b"}
    visible = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.startswith("."))
    assert visible == sorted([f"{s}{suffix}" for s in finished for suffix in
                              ("_depth.npy", "_depth_16bit.png", "_depth_colored.png")] + ["e_depth.npy"])
    assert not (out / "e_depth_16bit.png").exists()  # the one being written when the process died
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".e_depth_16bit.png.") and leftovers[0].endswith(".tmp")
    for stem in finished:  # what exists is whole
        assert np.load(out / f"{stem}_depth.npy").shape == (24, 40)
        assert np.asarray(Image.open(out / f"{stem}_depth_16bit.png")).shape == (24, 40)
        assert np.asarray(Image.open(out / f"{stem}_depth_colored.png")).shape == (24, 40, 3)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("[ab]_*")}

    assert infer.main([*common, "--skip_existing"]) == 0  # in this process: the same code, no start-up cost
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"3 written, 2 skipped \(already done\), 0 failed -> {re.escape(str(out))}, [0-9.]+ images/s",
                        last)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("[ab]_*")} == before, "recomputed"
    for name in names:
        stem = Path(name).with_suffix("")
        assert np.load(out / f"{stem}_depth.npy").shape == (24, 40)
        assert np.asarray(Image.open(out / f"{stem}_depth_colored.png")).shape == (24, 40, 3)
    # a second --skip_existing run has nothing left to do
    assert infer.main([*common, "--skip_existing"]) == 0
    assert "0 written, 5 skipped (already done), 0 failed" in capsys.readouterr().out


def test_outputs_inside_the_input_folder_are_not_inputs_and_name_clashes_are_reported(tmp_path, tiny_depth_checkpoint,
                                                                                      capsys):
    rng = np.random.default_rng(1)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / "x.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / "x.jpg")  # same stem
    for output in (images / "pred", images):
        code = infer.main(["--input", str(images), "--checkpoint", str(tiny_depth_checkpoint), "--output",
                           str(output), "--processing_res", "32"])
        captured = capsys.readouterr()
        assert code == 1
        assert f"failed: {images / 'x.png'}: its outputs would overwrite those of {images / 'x.jpg'}" in captured.err
        summary = rf"1 written, 0 skipped \(already done\), 1 failed -> {re.escape(str(output))}, [0-9.]+ images/s$"
        assert re.search(summary, captured.out.strip())
    # the second run wrote beside the inputs; neither its outputs nor those in pred/ were taken as images
    assert sorted(p.name for p in images.glob("*.png")) == ["x.png", "x_depth_16bit.png", "x_depth_colored.png"]


def test_a_non_finite_prediction_is_a_failure_not_a_file(tmp_path, tiny_depth_checkpoint, capsys):
    """A broken checkpoint (or an fp16 overflow) gives NaN: each image is reported, nothing garbage is written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = Path(shutil.copytree(tiny_depth_checkpoint, tmp_path / "nan-ckpt"))
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, weights)
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((12, 20, 3), 120, np.uint8)).save(images / name)
    code = infer.main(["--input", str(images), "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"),
                       "--processing_res", "32", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1
    for name in ("a.png", "b.png"):
        assert (f"failed: {images / name}: cannot write outputs (the prediction has 240 non-finite values, nothing "
                "written") in captured.err, captured.err
    assert captured.out.strip().endswith("0 written, 0 skipped (already done), 2 failed -> " + str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))
