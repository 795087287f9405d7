"""benchmarks/ run end to end on the tiny backbone at a small size (a smoke test: no timing is asserted, only that
both sides are measured and reported with their ratio, images/s, peak memory and the device)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import inference, train_step


@pytest.fixture(autouse=True)
def thread_flags(one_thread):
    """--num_threads 1 as the README's CPU rows use (the benchmark sets it; conftest's one_thread restores it)."""
    return ["--num_threads", "1"]


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_train_step_benchmark_reports_both_sides(tiny_backbone_dir, tmp_path, capsys, thread_flags):
    out = tmp_path / "train.json"
    result = train_step.main(["--backbone_dir", str(tiny_backbone_dir), "--resolution", "32", "--batch_size", "1",
                              "--warmup", "1", "--iterations", "1", "--rounds", "1", "--gradient_checkpointing",
                              "--json", str(out), *thread_flags])
    printed = capsys.readouterr().out
    for side in ("ours (d3_step)", "official-style reference"):
        assert side in printed
        assert _finite(result[side]["images_per_s"]) and _finite(result[side]["ms_per_image"])
        assert result[side]["peak_memory_bytes"] is not None
    assert "speed-up (images/s, ours / reference)" in printed and "peak memory (ours / reference)" in printed
    assert _finite(result["speedup"]) and math.isfinite(result["memory_ratio"])
    assert "device: CPU" in printed and "| side | device | precision |" in printed
    # The counted FLOPs show the reference's extra student and decoder copies.
    tflop = result["tflop_per_image"]
    assert tflop["reference"] > 1.5 * tflop["ours"]
    assert json.loads(out.read_text())["speedup"] == result["speedup"]


def test_inference_benchmark_reports_model_only_and_end_to_end(tiny_depth_checkpoint, tmp_path, capsys, thread_flags):
    result = inference.main(["--checkpoint", str(tiny_depth_checkpoint), "--resolution", "64", "--batch_size", "2",
                             "--num_images", "4", "--warmup", "1", "--rounds", "1",
                             "--json", str(tmp_path / "infer.json"), *thread_flags])
    printed = capsys.readouterr().out
    model, e2e = "model only (encode + UNet + decode)", "infer.py end to end (JPEG in, files out)"
    assert model in printed and e2e in printed and "end to end / model only" in printed
    assert result["written"] == result["images"] == 4  # every JPEG got its outputs
    assert _finite(result[model]["images_per_s"]) and _finite(result[e2e]["images_per_s"])
    assert _finite(result["ratio"]) and _finite(result["tflop_per_image"])
    assert "device: CPU" in printed


def test_peers_benchmark_reports_every_peer_and_the_ratios(tiny_backbone_dir, tmp_path, capsys, thread_flags):
    from benchmarks import peers

    result = peers.main(["--backbone_dir", str(tiny_backbone_dir), "--cache_dir", str(tmp_path / "cache"),
                         "--resolution", "64", "--num_images", "3", "--rounds", "1", "--padding_check_res", "72",
                         "--json", str(tmp_path / "peers.json"), *thread_flags])
    printed = capsys.readouterr().out
    model_only = "d3 model only (encode + UNet + decode, no files)"
    for side in (*peers.PEERS, peers.D3_THREADED, model_only):
        assert f"| {side} | CPU" in printed  # a table row per peer
        assert _finite(result[side]["images_per_s"]) and result[side]["peak_memory_bytes"] is not None
    for side in peers.PEERS:
        assert f"{side}: images/s relative to d3's" in printed
    for side in (*peers.PEERS, peers.D3_THREADED):
        assert result["written"][side] == result["images"] == 3  # every photograph got its files
    assert set(result["speedups"]) == {peers.MARIGOLD, peers.AUTHORS}
    assert all(_finite(s) for s in result["speedups"].values()) and _finite(result["ratio_e2e_model"])
    assert _finite(result["ratio_threaded"]) and f"{peers.D3_THREADED} / {peers.D3} (images/s)" in printed
    assert "d3 end to end / d3 model only (images/s)" in printed
    assert printed.count("goal: d3 / ") == 2 and "goal: d3 end to end / model only" in printed
    assert "GEMM peak" in printed and 0 < result["efficiency_model"] < 1.5
    assert result["padding"]["pixel_ratio"] >= 1 and _finite(result["padding"]["time_ratio"])
    assert json.loads((tmp_path / "peers.json").read_text())["images"] == 3


def test_peers_benchmark_falls_back_to_synthetic_scenes_without_scikit_image(tmp_path, monkeypatch):
    import sys

    from PIL import Image

    from benchmarks import peers

    monkeypatch.setitem(sys.modules, "skimage", None)  # `from skimage import data` raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    source, sizes = peers.write_photos(tmp_path, 3, 32)
    assert source.startswith("d3.data.synthetic scenes")
    files = sorted(tmp_path.glob("*.jpg"))
    assert [f"{Image.open(f).size[0]}x{Image.open(f).size[1]}" for f in files] == sizes
    assert len(set(sizes)) == 3  # mixed sizes and aspect ratios


def test_validation_benchmark_reports_the_validation_against_the_step(tiny_backbone_dir, tmp_path, capsys,
                                                                      thread_flags):
    from benchmarks import validation

    out = tmp_path / "validation.json"
    result = validation.main(["--backbone_dir", str(tiny_backbone_dir), "--resolution", "32", "--steps", "3",
                              "--every", "2", "--samples", "2", "--pictures", "1", "--json", str(out), *thread_flags])
    printed = capsys.readouterr().out
    assert len(result["validation_s"]) == 2  # steps 2 and 3 (the last)
    assert _finite(result["step_s"]) and _finite(result["s_per_validation_image"])
    assert result["images_per_validation"] == 3
    # the share follows from the measured times: (280 samples + 12 pictures) images against 500 updates
    expected = 292 * result["s_per_validation_image"] / (500 * result["step_s"])
    assert math.isclose(result["paper_sets_every_500_share"], expected)
    assert "% of the training time" in printed
    assert json.loads(out.read_text())["step_s"] == result["step_s"]
