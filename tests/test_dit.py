"""DiT backbones (FLUX.1, the paper's Table 6 variant): a tiny Flux built from its config goes through the same
loading, hooks, training step, training loop and checkpoints as the UNet.

- hooks: the default set is the last 25 single-stream blocks (checked on FLUX.1-dev's real config, on the meta
  device), image tokens only, on the 2×2-packed latent grid, token (i, j) at grid cell (i, j);
- the efficient step equals the official-style step (float64, every loss and gradient);
- a tiny Flux trained on synthetic scenes beats the untrained one on held-out scenes;
- a LoRA student saves merged and as an adapter, reloads, and predicts identically;
- the FSDP config parses through accelerate's launcher into the intended FSDP settings.
"""

from __future__ import annotations

import copy
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import train_depth
from d3.backbone import encode_condition, load_backbone
from d3.denoisers import DIT_STUDENT_TIMESTEP, FluxDenoiser, as_denoiser, detect_architecture
from d3.heads import ProjectionHeads
from d3.checkpoint import CheckpointError, D3Config
from d3.predictor import D3Predictor, predictor_from_backbone
from d3.objective import D3Model, Objective, Teacher, d3_step
from d3.training import build_parser, train
from d3.training_checkpoints import export_predictor
from d3.training_setup import build_student_and_teacher, make_optimizer
from d3.reference_step import per_copy_step
from tests.helpers import rel_err
from tests.test_equivalence import REL_TOL, cast_batch, depth_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from d3.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-flux") / "backbone", preset="tiny-flux")


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    from d3.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-sd3") / "backbone", preset="tiny-sd3")


def _flux_meta(**config) -> FluxDenoiser:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxDenoiser(FluxTransformer2DModel(**config))


# ------------------------------------------------------------------------------------------- packing and hooks
@pytest.mark.quick
def test_packing_puts_each_2x2_patch_in_one_token_channel_major():
    c, h, w = 2, 4, 6
    latents = torch.arange(c * h * w, dtype=torch.float32).reshape(1, c, h, w)
    tokens = FluxDenoiser.pack(latents)
    assert tokens.shape == (1, (h // 2) * (w // 2), 4 * c)
    # token (row 1, col 2) = patch rows 2-3, cols 4-5; channel-major, then the 2x2 patch row-major
    token = tokens[0, 1 * (w // 2) + 2]
    expected = [latents[0, ch, 2 + dy, 4 + dx] for ch in range(c) for dy in range(2) for dx in range(2)]
    assert token.tolist() == torch.stack(expected).tolist()
    assert torch.equal(FluxDenoiser.unpack(tokens, h, w), latents)
    ids = FluxDenoiser.image_ids(h // 2, w // 2, "cpu")
    assert ids[1 * (w // 2) + 2].tolist() == [0.0, 1.0, 2.0]


def test_flux_dev_layer_sets_on_its_real_config():
    """FLUX.1-dev: 19 double- and 38 single-stream blocks of width 3072; the paper aligns the last 25 single ones."""
    flux = _flux_meta(guidance_embeds=True)
    layers = flux.layer_set()
    assert layers == [f"single_transformer_blocks.{i}" for i in range(13, 38)]
    assert len(flux.layer_set("double")) == 19 and len(flux.layer_set("all")) == 57
    assert flux.layer_set("single:5") == [f"single_transformer_blocks.{i}" for i in range(33, 38)]
    assert set(flux.feature_channels(layers).values()) == {3072}
    # a 768x768 image: 96x96 latent, 48x48 packed grid; the hooks give (N, 3072, 48, 48) for each of the 25 layers
    capture = flux.feature_capture(layers)
    meta = torch.device("meta")
    cond = {"encoder_hidden_states": torch.empty(1, 512, 4096, device=meta),
            "pooled_projections": torch.empty(1, 768, device=meta)}
    with torch.no_grad():
        out = flux(torch.empty(2, 16, 96, 96, device=meta), torch.tensor(420.0, device=meta), cond)
    features = capture.pop()
    assert out.shape == (2, 16, 96, 96)
    assert len(features) == 25 and all(f.shape == (2, 3072, 48, 48) for f in features.values())
    with pytest.raises(ValueError, match="unknown layer set"):
        flux.layer_set("up")


@pytest.mark.quick
def test_hooks_give_image_tokens_on_the_packed_grid(tiny_flux_dir):
    backbone = load_backbone(tiny_flux_dir)
    flux = backbone.denoiser()
    cond = encode_condition(backbone, "a depth map")
    layers = flux.layer_set()
    assert layers == [f"single_transformer_blocks.{i}" for i in range(3)]  # the last 25 of 3 = all of them
    raw = {}
    handle = flux.model.single_transformer_blocks[1].register_forward_hook(lambda m, a, o: raw.update(out=o))
    capture = flux.feature_capture(layers + ["transformer_blocks.0"])
    latents = torch.randn(2, 16, 12, 20)  # a non-square latent: 6x10 token grid
    with torch.no_grad():
        flux(latents, torch.tensor(300.0), cond)
    handle.remove()
    features = capture.pop()
    assert all(f.shape == (2, 32, 6, 10) for f in features.values())
    text, image = raw["out"]
    assert text.shape[1] == cond["encoder_hidden_states"].shape[1]  # the text tokens are not part of the features
    grid = features["single_transformer_blocks.1"]
    assert torch.equal(grid[:, :, 4, 7], image[:, 4 * 10 + 7])  # token (i, j) sits at grid cell (i, j)


@pytest.mark.quick
def test_flow_matching_noise_and_stratified_sigmas():
    flux = _flux_meta()
    x, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    noisy = flux.add_noise(x, eps, torch.tensor([250.0, 900.0]))
    assert torch.allclose(noisy[0], torch.full((1, 2, 2), 0.75 * 2 - 0.25)) and torch.allclose(noisy[1], torch.full((1, 2, 2), 0.1 * 2 - 0.9))
    t = flux.sample_timesteps(4096, 3, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (4096, 3)
    for k in range(3):  # bins of σ over [0.001, 0.999], as 1000·σ
        lo, hi = 1 + k * 998 / 3, 1 + (k + 1) * 998 / 3
        assert lo <= float(t[:, k].min()) < lo + 2 and hi - 2 < float(t[:, k].max()) <= hi
    assert DIT_STUDENT_TIMESTEP == 420 and flux.default_student_timestep == 420.0


# --------------------------------------------------------------------------------------- the step equals the reference
def _dit_parts(backbone_dir, dtype):
    backbone = load_backbone(backbone_dir)
    cond = {k: v.to(dtype) for k, v in encode_condition(backbone, "a depth map").items()}
    teacher = backbone.denoiser()
    teacher.model.requires_grad_(False).eval().to(dtype)
    student = type(teacher)(copy.deepcopy(teacher.model).requires_grad_(True).train())
    layers = student.layer_set()
    heads = ProjectionHeads(student.feature_channels(layers), "cleandift")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():  # off the identity init, so the heads take part in what is compared
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = D3Model(student, heads, layers, None).to(dtype)
    return model, teacher, teacher.feature_capture(layers), backbone.vae.requires_grad_(False).to(dtype), cond


@pytest.mark.parametrize("preset", ["flux", "sd3"])
def test_efficient_step_equals_official_step_with_a_dit_backbone(preset, request):
    dtype = torch.float64
    model, teacher, capture, vae, cond = _dit_parts(request.getfixturevalue(f"tiny_{preset}_dir"), dtype)
    assert model.student_timestep.item() == 420.0
    batch = cast_batch(depth_batch(), dtype)
    g = torch.Generator().manual_seed(0)
    timesteps = teacher.sample_timesteps(2, 3, generator=g)
    noise = torch.randn(2, 3, 16, 16, 16, generator=g).to(dtype)
    results = []
    for step in (d3_step, per_copy_step):
        model.zero_grad(set_to_none=True)
        out = step(model, Teacher(teacher, capture), vae, cond,
                   Objective(train_depth.depth_task_loss, train_depth.LOSS_WEIGHTS), batch, timesteps, noise)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (ref, ref_grads) = results
    assert len(fast.per_layer) == (3 if preset == "flux" else 2)
    for layer in ref.per_layer:
        assert rel_err(fast.per_layer[layer], ref.per_layer[layer]) <= REL_TOL, layer
    for term in ref.task_terms:
        assert rel_err(fast.task_terms[term], ref.task_terms[term]) <= REL_TOL, term
    assert rel_err(fast.loss, ref.loss) <= REL_TOL
    assert set(fast_grads) == set(ref_grads) and "student_timestep" in fast_grads
    assert any(n.startswith(f"student.{model.layers[-1]}.") for n in fast_grads)
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(ref_grads)])  # noqa: E731
    assert rel_err(flat(fast_grads), flat(ref_grads)) <= REL_TOL


# --------------------------------------------------------------------------------------------------- learning
def _args(backbone_dir, data_dir, out_dir, steps, *extra):
    return build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(backbone_dir), "--dataset", str(data_dir),
        "--output_dir", str(out_dir), "--resolution", "64", "--train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--learning_rate", "3e-4",
        "--lr_warmup_steps", "0", "--checkpointing_steps", "100000", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ])


def test_training_a_tiny_flux_beats_the_untrained_model(tiny_flux_dir, synthetic_train_dir, tmp_path, one_thread):
    """The task is learnt (held-out AbsRel down by ≥ 30%; measured 0.41 -> 0.25) while L_agg holds the student's
    features at the experts'. In a 4-block random Flux the noisy experts' tokens are dominated by the input noise,
    so L_agg has little to lose (1.92 -> 1.92 over training): what shows the alignment working is the control
    run without it (same seed, same batches and noise), whose L_agg drifts away at once (2.28 vs 1.91 by step 30)."""
    from d3.data.synthetic import render_scene
    from tests.test_learning import heldout_absrel

    scenes = [render_scene(50_000 + i, 64, 64) for i in range(16)]
    before = heldout_absrel(predictor_from_backbone(tiny_flux_dir, "depth", device="cpu"), scenes)
    result = train(_args(tiny_flux_dir, synthetic_train_dir, tmp_path / "run", 150, "--learning_rate", "1e-3"),
                   train_depth.RECIPE)
    config = json.loads((result.output_dir / "d3_config.json").read_text())
    assert config["architecture"] == "flux" and (result.output_dir / "transformer").is_dir()
    after = heldout_absrel(D3Predictor.from_pretrained(result.output_dir, device="cpu"), scenes)
    assert after <= 0.7 * before, f"held-out AbsRel {before:.4f} -> {after:.4f}"
    align = [h["loss/align"] for h in result.history]
    assert np.mean(align[-30:]) <= np.mean(align[:30]) + 0.05, f"L_agg {np.mean(align[:30]):.4f} -> {np.mean(align[-30:]):.4f}"
    control = train(_args(tiny_flux_dir, synthetic_train_dir, tmp_path / "control", 30, "--learning_rate", "1e-3",
                          "--lambda_align", "0"), train_depth.RECIPE)
    drift = [h["loss/align"] for h in control.history]
    assert np.mean(drift[10:30]) > np.mean(align[10:30]) + 0.1, f"{np.mean(drift[10:30]):.4f} vs {np.mean(align[10:30]):.4f}"


# ------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch", ["flux", "unet"])
def test_lora_student_saves_merged_and_as_adapter_and_predicts_identically(arch, request, tmp_path):
    backbone_dir = request.getfixturevalue("tiny_flux_dir" if arch == "flux" else "tiny_backbone_dir")
    backbone = load_backbone(backbone_dir)
    cond = encode_condition(backbone, train_depth.PROMPT)
    args = Namespace(lora_rank=4, lora_alpha=None, prompt=train_depth.PROMPT, resolution=64,
                     pretrained_model_name_or_path=str(backbone_dir), save_lora_as="merged")
    student, teacher = build_student_and_teacher(args, backbone, torch.device("cpu"), torch.float32)
    assert teacher.model is student.model and teacher.adapters_off  # the teacher shares the frozen base weights
    trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # trained adapters: B no longer zero
        for n, p in student.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    layers = student.layer_set()
    model = D3Model(student, ProjectionHeads(student.feature_channels(layers)), layers, 400.0)

    export_predictor(tmp_path / "merged", model, backbone.vae, cond, args, train_depth.RECIPE)
    args.save_lora_as = "adapter"
    export_predictor(tmp_path / "adapter", model, backbone.vae, cond, args, train_depth.RECIPE)
    adapter_config = json.loads((tmp_path / "adapter" / "d3_config.json").read_text())
    folder = student.subfolder  # transformer/ or unet/
    assert adapter_config["lora_adapter"] == f"{folder}_lora" and not (tmp_path / "adapter" / folder).exists()
    assert (tmp_path / "merged" / folder / "config.json").exists()

    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    in_memory = D3Predictor(student.model, backbone.vae, cond, D3Config(task="depth", student_timestep=400.0,
                            processing_res=0, architecture=arch), device="cpu")
    expected = in_memory.predict([image])[0]
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        z = torch.randn(1, student.latent_channels, 16, 16)
        base_out, lora_out = teacher(z, 400.0, cond), student(z, 400.0, cond)
    assert not torch.allclose(base_out, lora_out, atol=1e-4)  # the adapters change the network
    for folder in ("merged", "adapter"):
        loaded = D3Predictor.from_pretrained(tmp_path / folder, device="cpu")
        assert loaded.config.architecture == arch and loaded.config.student_timestep == 400.0
        got = loaded.predict([image], processing_res=0)[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=folder)
        assert loaded.predict_tensor(x).shape == (1, 3, 64, 64)


def test_lora_training_runs_and_leaves_the_base_weights_untouched(tiny_flux_dir, synthetic_train_dir, tmp_path,
                                                                   one_thread):
    from safetensors.torch import load_file

    result = train(_args(tiny_flux_dir, synthetic_train_dir, tmp_path / "run", 4, "--lora_rank", "4",
                         "--save_lora_as", "adapter", "--gradient_checkpointing"), train_depth.RECIPE)
    assert len(result.history) == 4 and all(np.isfinite(h["loss"]) for h in result.history)
    adapter = load_file(str(result.output_dir / "transformer_lora" / "pytorch_lora_weights.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
    predictor = D3Predictor.from_pretrained(result.output_dir, device="cpu")
    base = load_file(str(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = predictor.unet.state_dict()
    for key, value in base.items():  # the frozen base weights, as loaded under the adapter, are the pretrained ones
        owner, leaf = key.rsplit(".", 1)
        assert torch.equal(state[key] if key in state else state[f"{owner}.base_layer.{leaf}"], value), key


@pytest.mark.quick
def test_adapter_checkpoint_without_its_base_model_fails_clearly(tiny_flux_dir, tmp_path):
    backbone = load_backbone(tiny_flux_dir)
    args = Namespace(lora_rank=2, lora_alpha=None, prompt="p", resolution=64, save_lora_as="adapter",
                     pretrained_model_name_or_path=str(tmp_path / "moved-away"))
    student, _ = build_student_and_teacher(args, backbone, torch.device("cpu"), torch.float32)
    model = D3Model(student, ProjectionHeads(student.feature_channels(student.layer_set())), student.layer_set())
    export_predictor(tmp_path / "ckpt", model, backbone.vae, encode_condition(backbone, "p"), args, train_depth.RECIPE)
    with pytest.raises(CheckpointError, match="needs its base model"):
        D3Predictor.from_pretrained(tmp_path / "ckpt", device="cpu")


# ------------------------------------------------------------------------------------------ checkpoints and CLI
@pytest.mark.quick
def test_checkpoint_config_defaults_to_unet_and_names_a_bad_architecture(tmp_path):
    (tmp_path / "d3_config.json").write_text(json.dumps({"task": "depth", "student_timestep": 261.0}))
    assert D3Config.read(tmp_path).architecture == "unet"  # checkpoints written before DiTs load as UNets
    (tmp_path / "d3_config.json").write_text(json.dumps({"task": "depth", "architecture": "dit"}))
    with pytest.raises(CheckpointError, match="architecture 'dit'"):
        D3Config.read(tmp_path)


def test_flux_checkpoint_keeps_its_conditioning_and_infer_runs_unchanged(tiny_flux_dir, tmp_path):
    import subprocess
    import sys

    from PIL import Image
    from safetensors.torch import load_file

    assert detect_architecture(tiny_flux_dir) == "flux"
    ckpt = tmp_path / "ckpt"
    predictor_from_backbone(tiny_flux_dir, "depth", device="cpu", processing_res=64).save_pretrained(ckpt)
    tensors = load_file(str(ckpt / "prompt_embeds.safetensors"))
    assert set(tensors) == {"encoder_hidden_states", "pooled_projections", "guidance"}
    assert tensors["encoder_hidden_states"].shape == (1, 32, 32) and tensors["guidance"].tolist() == [3.5]
    assert not (ckpt / "unet").exists() and detect_architecture(ckpt) == "flux"
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--input", str(tmp_path / "in"), "--checkpoint",
                           str(ckpt), "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "out" / "a_depth.npy").shape == (50, 70)


def test_8bit_adam_without_bitsandbytes_fails_with_a_clear_message():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed (the 8-bit optimizer itself needs CUDA)")
    except ImportError:
        pass
    args = Namespace(use_8bit_adam=True, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999,
                     adam_weight_decay=0.0, adam_epsilon=1e-8)
    with pytest.raises(SystemExit, match="bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], args, torch.device("cpu"))


def test_sd3_backbone_conditions_hooks_trains_and_reloads(tiny_sd3_dir, synthetic_train_dir, tmp_path, one_thread):
    """The lighter DiT: CLIP-L|CLIP-G states zero-padded to T5's width, then T5; features on the patch grid."""
    backbone = load_backbone(tiny_sd3_dir)
    cond = encode_condition(backbone, "a depth map")
    assert cond["encoder_hidden_states"].shape == (1, 77 + 32, 32) and cond["pooled_projections"].shape == (1, 64)
    assert torch.all(cond["encoder_hidden_states"][:, :77, 16:] == 0)  # 8 + 8 CLIP channels, padded to 32
    sd3 = backbone.denoiser()
    assert sd3.architecture == "sd3" and sd3.layer_set() == ["transformer_blocks.2", "transformer_blocks.3"]
    capture = sd3.feature_capture(sd3.layer_set())
    with torch.no_grad():
        out = sd3(torch.randn(2, 16, 12, 20), torch.tensor(300.0), cond)
    assert out.shape == (2, 16, 12, 20)
    assert all(f.shape == (2, 16, 6, 10) for f in capture.pop().values())
    capture.remove()
    result = train(_args(tiny_sd3_dir, synthetic_train_dir, tmp_path / "run", 3), train_depth.RECIPE)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    predictor = D3Predictor.from_pretrained(result.output_dir, device="cpu")
    assert predictor.config.architecture == "sd3" and predictor.size_multiple == 8
    image = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    again = D3Predictor.from_pretrained(result.output_dir, device="cpu").predict([image], processing_res=0)[0]
    np.testing.assert_array_equal(predictor.predict([image], processing_res=0)[0], again)


@pytest.mark.quick
def test_as_denoiser_picks_the_architecture_and_rejects_others():
    assert as_denoiser(_flux_meta().model).architecture == "flux"
    with pytest.raises(TypeError, match="no Denoiser for a Linear"):
        as_denoiser(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------- FSDP
def test_fsdp_config_parses_into_full_sharding_of_the_flux_blocks(monkeypatch):
    """What `accelerate launch --config_file configs/fsdp_flux.yaml` hands the training processes. (Building the
    FSDP plugin itself needs a GPU, and an FSDP run needs several: neither is possible on a CPU-only machine.)"""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from accelerate.utils.dataclasses import get_module_class_from_name

    config = ROOT / "configs" / "fsdp_flux.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train_depth.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_USE_ORIG_PARAMS"] == "true"
    flux = _flux_meta(num_layers=1, num_single_layers=1).model
    for name in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):  # every wrapped class exists in the Flux model
        assert get_module_class_from_name(flux, name) is not None, name
