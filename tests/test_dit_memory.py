"""benchmarks/dit_memory.py: the computed training memory per option (issue 8).

- FLUX.1-dev's parameter count is the meta-device model's own (11.8e9-12.0e9);
- the LoRA count equals what peft really injects (tiny Flux, tiny SD3, tiny UNet tensor by tensor; FLUX.1-dev and
  SD3-medium on the meta device);
- every row's byte arithmetic, on a hand-made case, gives the values worked out by hand;
- the CLI prints the table and writes the rows as JSON.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import dit_memory as dm
from benchmarks.dit_memory import Counts, Part


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flux_dev_count_is_the_meta_models():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    expected = sum(p.numel() for p in model.parameters())
    counts = dm.count("flux-dev", ranks=(4,))
    assert counts.student.params == expected
    assert 11.8e9 < counts.student.params < 12.0e9
    assert counts.layers == 25  # the last 25 single-stream blocks
    # the FSDP units are the config's wrapped block classes: 19 double + 38 single blocks
    assert dm.fsdp_settings()["wrap"] == ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    assert len(counts.fsdp_units) == 57


def _tiny(kind: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from d3.denoisers import FluxDenoiser, SD3Denoiser, UNetDenoiser
    from d3.tiny import DIT_PRESETS, unet_config

    torch.manual_seed(0)
    if kind == "flux":
        return FluxTransformer2DModel(**DIT_PRESETS["tiny-flux"]["transformer"]), FluxDenoiser.lora_targets
    if kind == "sd3":
        return SD3Transformer2DModel(**DIT_PRESETS["tiny-sd3"]["transformer"]), SD3Denoiser.lora_targets
    return UNet2DConditionModel(**unet_config("tiny")), UNetDenoiser.lora_targets


@pytest.mark.parametrize("kind", ["flux", "sd3", "unet"])
@pytest.mark.parametrize("rank", [2, 5])
def test_lora_count_equals_peft_injection(kind, rank):
    from d3.lora import add_lora, lora_parameter_count

    model, targets = _tiny(kind)
    predicted = dm.lora_tensors(model, targets, rank)
    assert dm.lora_count(model, targets, rank) == sum(predicted) > 0
    add_lora(model, rank, targets)
    assert lora_parameter_count(model) == sum(predicted)
    injected = [p.numel() for n, p in model.named_parameters() if "lora_" in n]
    assert sorted(injected) == sorted(predicted)  # the same tensors, not only the same total


@pytest.mark.parametrize("backbone", ["flux-dev", "sd3-medium"])
def test_lora_count_equals_peft_injection_on_the_real_configs(backbone):
    """The same check on the full-size models, weightless: peft injects on the meta device too."""
    from d3.lora import add_lora, lora_parameter_count

    denoiser, _ = dm.meta_backbone(backbone)
    predicted = dm.lora_count(denoiser.model, denoiser.lora_targets, 64)
    with torch.device("meta"):
        add_lora(denoiser.model, 64, denoiser.lora_targets)
    assert lora_parameter_count(denoiser.model) == predicted


def test_lora_count_refuses_non_linear_targets():
    from torch import nn

    model = nn.Sequential()
    model.add_module("proj_in", nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="not nn.Linear"):
        dm.lora_count(model, ("proj_in",), 4)


def _hand_made() -> Counts:
    return Counts(
        backbone="hand",
        student=Part("student", [8192, 100], buffers=10),  # 8292 parameters
        heads=Part("heads", [4096, 50, 1], buffers=3),  # 4147
        vae=Part("vae", [60]),
        lora={2: Part("lora", [300, 5000])},  # 5300
    )


def test_row_bytes_by_hand():
    rows = {r["key"]: r for r in dm.memory_rows(_hand_made(), num_gpus=4, ranks=(2,))}
    frozen = 2 * (8292 + 10) + 2 * 60  # bf16 teacher (or shared base) with its buffers + bf16 VAE = 16724
    trained = 8292 + 4147  # 12439
    expected = {
        # fp32 weights (+ buffers), fp32 grads, AdamW 8 B/param
        "full-adamw": (4 * (trained + 13), 4 * trained, 8 * trained, frozen),
        # AdamW8bit: 8192 -> 2*8192 + 8*32 absmax; 100 (< 4096) -> fp32 800; 4096 -> 8192 + 8*16; 50 -> 400; 1 -> 8
        "full-adamw8bit": (4 * (trained + 13), 4 * trained, 16640 + 800 + 8320 + 400 + 8, frozen),
        # sharded over 4 GPUs; buffers, teacher and VAE whole
        "fsdp4-adamw": (trained + 4 * 13, trained, 2 * trained, frozen),
        # LoRA 5300 + heads 4147 = 9447 trained, the base shared by student and teacher
        "lora2-adamw": (4 * (9447 + 3), 4 * 9447, 8 * 9447, frozen),
        # 300 -> fp32 2400; 5000 -> 10000 + 8*20 absmax; heads as above 8728
        "lora2-adamw8bit": (4 * (9447 + 3), 4 * 9447, 2400 + 10160 + 8728, frozen),
    }
    assert list(rows) == list(expected)
    for key, (weights, grads, states, frozen_bytes) in expected.items():
        b = rows[key]["bytes"]
        assert (b["trained_weights"], b["grads"], b["optimizer_states"], b["frozen_weights"]) == \
            (weights, grads, states, frozen_bytes), key
        assert b["total"] == weights + grads + states + frozen_bytes
    assert [rows[k]["bytes"]["total"] for k in expected] == [215800, 142456, 66532, 167888, 113600]
    assert rows["lora2-adamw"]["trainable_params"] == 9447
    assert rows["full-adamw"]["trainable_student"] == 8292 and rows["full-adamw"]["trainable_heads"] == 4147


def test_verdict():
    assert dm.verdict(60e9, 80, 10) == "yes (20.0 GB left)"
    assert dm.verdict(75e9, 80, 10) == "tight (5.0 GB left)"
    assert dm.verdict(90e9, 80, 10) == "no (10.0 GB over)"


def test_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "memory.json"
    result = dm.main(["--backbone", "flux-dev", "--num_gpus", "4", "--lora_rank", "8", "32", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    keys = ["full-adamw", "full-adamw8bit", "fsdp4-adamw", "lora8-adamw", "lora8-adamw8bit", "lora32-adamw",
            "lora32-adamw8bit"]
    assert [r["key"] for r in data["rows"]] == keys == [r["key"] for r in result["rows"]]
    assert data["num_gpus"] == 4 and data["lora_ranks"] == [8, 32]
    assert data["params"]["student"] == result["params"]["student"]
    for row in data["rows"]:
        assert row["option"] in printed and row["fits"] in printed
        assert row["gb"]["total"] == pytest.approx(row["bytes"]["total"] / 1e9, abs=1e-3)
    rows = {r["key"]: r for r in data["rows"]}
    assert not rows["full-adamw"]["fits_with_headroom"]  # 16 B/param x 11.9B does not fit one GPU
    assert rows["lora8-adamw"]["bytes"]["total"] < rows["lora32-adamw"]["bytes"]["total"]
    assert "not measured" in printed and "GB = 1e9 bytes" in printed


# ------------------------------------------------------------------ benchmarks/activation_memory.py (issue 19)
def test_retained_counts_saved_activations_not_weights():
    """Linear -> ReLU -> Linear in fp32: autograd keeps the input (first Linear) and the ReLU output (saved by the
    ReLU and the second Linear: one storage), never the weights: 4 B x N x (8 + 16)."""
    from torch import nn

    from benchmarks.activation_memory import Retained

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for n in (3, 10):
        meter = Retained(model)
        x = torch.randn(n, 8, requires_grad=True)
        with meter.hooks():
            model(x).sum()
        assert sum(b for b, _ in meter.storages.values()) == 4 * n * (8 + 16)


def test_retained_checkpoint_keeps_the_inputs_and_records_the_recompute_peak():
    from torch import nn

    from benchmarks.activation_memory import Retained

    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(5, 8, requires_grad=True)
    meter = Retained(block)
    with meter.hooks():
        y = meter.checkpoint(block, x)
    # kept: only the segment's input; recomputed in backward: what the plain block saves (input + ReLU output)
    assert sum(b for b, _ in meter.storages.values()) == 4 * 5 * 8
    assert meter.recompute_peak == 4 * 5 * (8 + 16)
    y.sum().backward()  # and it is a real checkpoint: gradients flow
    plain = x.detach().clone().requires_grad_()
    block(plain).sum().backward()
    torch.testing.assert_close(x.grad, plain.grad)


def test_fit_recovers_batch_and_pixel_terms():
    from benchmarks.activation_memory import at, fit

    w, a, b = 1000.0, 70.0, 3.0
    points = {(bs, s): w + bs * (a + b * s * s) for bs, s in ((1, 32), (1, 64), (2, 32))}
    f = fit(points)
    assert f == pytest.approx({"W": w, "a": a, "b": b})
    assert at(f, 4, 768) == pytest.approx(w + 4 * (a + b * 768 * 768))


def test_activation_memory_cli_on_the_tiny_backbones(tmp_path, capsys):
    """The CI-size run: every recipe gets every part, a total that is their sum and a verdict against the capacity;
    the static part is dit_memory's; head checkpointing leaves no head activations."""
    from benchmarks import activation_memory as am

    out = tmp_path / "act.json"
    res = am.main(["--backbones", "tiny", "tiny-flux", "--sizes", "32", "64", "--resolutions", "64",
                   "--num_threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["recipes"]] == [r[0] for r in am.RECIPES]
    assert set(data["coefficients"]) == {"tiny", "tiny-flux"}
    for r in res["recipes"]:
        assert r["total"] == pytest.approx(sum(r["parts"].values()))
        assert r["name"] in printed and r["verdict"] in printed
        assert r["fits_with_10pc"] == (r["total"] <= 0.9 * am.H100_BYTES)
        assert r["parts"]["activations: student"] > 0 and r["parts"]["activations: VAE decoder"] > 0
        assert (r["parts"]["activations: heads"] == 0) == r["head_checkpointing"]
        static = {row["key"]: row for row in dm.memory_rows(am.counts_for(r["backbone"]), r["gpus"], (16, 64))}
        row = static[am.static_key(r["kind"], r["gpus"])]["bytes"]
        assert r["parts"]["frozen weights (teacher, VAE)"] == row["frozen_weights"]
        assert r["parts"]["weights, gradients, optimizer states"] == \
            row["trained_weights"] + row["grads"] + row["optimizer_states"]
    by_name = {r["name"]: r for r in res["recipes"]}
    plain = by_name["SD 2.1, 8 GPUs DDP, B=4"]["parts"]
    ckpt = by_name["SD 2.1, 8 GPUs DDP, B=4, --gradient_checkpointing"]["parts"]
    assert ckpt["activations: student"] < plain["activations: student"]
    assert ckpt["activations: VAE decoder"] < plain["activations: VAE decoder"]
    assert plain["activations: heads"] > 0 and ckpt["activations: heads"] == 0
