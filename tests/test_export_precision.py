"""What a low-precision training writes: the checkpoint's VAE is the pretrained fp32 one bit for bit (not the bf16
copy the step ran with), and a merged LoRA student is W + B·A in fp32, predicting as the trained adapter model did.
Runs on the CPU (bf16 autocast), with the tiny backbone."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import train_depth
from d3.checkpoint import load_model
from d3.devices import cast_module
from d3.lora import add_lora, save_weights
from d3.training import build_parser, train
from tests.helpers import rel_err

VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def test_bf16_training_exports_the_pretrained_fp32_vae(tiny_backbone_dir, synthetic_train_dir, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
        "--output_dir", str(tmp_path / "run"), "--resolution", "32", "--train_batch_size", "1",
        "--max_train_steps", "1", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none",
        "--dataloader_num_workers", "0", "--mixed_precision", "bf16", "--seed", "0"])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(args, train_depth.RECIPE)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    exported = load_file(result.output_dir / VAE_FILE)
    pretrained = load_file(tiny_backbone_dir / VAE_FILE)
    assert exported.keys() == pretrained.keys()
    for name, value in pretrained.items():
        assert value.dtype == torch.float32
        assert exported[name].dtype == torch.float32, name
        assert torch.equal(exported[name], value), name  # bit for bit, not bf16-rounded
    assert (result.output_dir / "vae" / "config.json").exists()


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_merged_lora_export_predicts_as_the_adapter_model_in_fp32(tiny_unet, tmp_path):
    pytest.importorskip("peft")
    # The LoRA training setup: a bf16 base with fp32 adapters, the adapters trained away from zero.
    model = cast_module(tiny_unet, torch.device("cpu"), torch.bfloat16)
    add_lora(model, 4, ("to_q", "to_k", "to_v", "to_out.0"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    # The trained model's function, evaluated in fp32: widening the bf16 base to fp32 is exact.
    reference_model = copy.deepcopy(model).float()
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        want = reference_model(x, 261.0, encoder_hidden_states=cond).sample

    folder = save_weights(model, tmp_path / "unet")
    from diffusers import UNet2DConditionModel

    saved = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    merged = load_model(UNet2DConditionModel, folder, "UNet")
    with torch.no_grad():
        got = merged(x, 261.0, encoder_hidden_states=cond).sample
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
