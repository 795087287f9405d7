"""The paper's few-shot domain tasks (§4.2.4, Tables 4 and 10-29) by flags alone: train_matting.py on a folder of
image/mask pairs with 15 samples, the task's own prompt and a plain MSE loss, then evaluate.py --dataset folder
scores IoU / pixel accuracy / Dice of the trained checkpoint on every pair of the folder."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate
import train_matting
from d3.backbone import encode_condition, load_backbone
from d3.data.synthetic import render_scene
from d3.training import build_parser, train

PROMPT = "a binary mask of the cracks in the pavement"
FEW_SHOT_FLAGS = ["--max_train_samples", "15", "--lambda_l1", "0", "--lambda_grad", "0", "--prompt", PROMPT]


@pytest.fixture(scope="module")
def crack_task(tmp_path_factory) -> Path:
    """20 image/mask pairs in the layout the README asks for (images/ + masks/, masks 0/255 greyscale)."""
    root = tmp_path_factory.mktemp("fewshot") / "crack_task"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(20):
        scene = render_scene(70_000 + i, 32, 32)
        Image.fromarray(scene.rgb).save(root / "images" / f"sample_{i:02d}.png")
        Image.fromarray(np.where(scene.alpha > 0.5, 255, 0).astype(np.uint8)).save(root / "masks" / f"sample_{i:02d}.png")
    return root


def test_few_shot_recipe_trains_on_15_samples_with_its_prompt_and_mse_only(crack_task, tiny_backbone_dir, tmp_path,
                                                                           caplog):
    caplog.set_level(logging.INFO, logger="d3.train")
    out = tmp_path / "d3-crack"
    args = build_parser(train_matting.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(crack_task), "--output_dir",
        str(out), "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "2", "--lr_warmup_steps", "0",
        "--checkpointing_steps", "1000", "--report_to", "none", "--dataloader_num_workers", "0", *FEW_SHOT_FLAGS])
    result = train(args, train_matting.RECIPE)

    assert re.search(r"source \S+\s+15 samples", caplog.text), caplog.text  # 15 of the folder's 20 pairs
    for row in result.history:  # L = L_agg + λ·5·MSE: the L1 and gradient terms are logged but weigh nothing
        assert row["loss"] == pytest.approx(row["loss/align"] + 5.0 * row["loss/mse"], rel=1e-5)
        assert row["loss/l1"] > 0 and row["loss/grad"] > 0

    config = json.loads((out / "d3_config.json").read_text())
    assert config["task"] == "matting" and config["prompt"] == PROMPT
    backbone = load_backbone(tiny_backbone_dir)
    expected = encode_condition(backbone, PROMPT)["encoder_hidden_states"]
    default = encode_condition(backbone, train_matting.PROMPT)["encoder_hidden_states"]
    saved = load_file(out / "prompt_embeds.safetensors")["prompt_embeds"]
    torch.testing.assert_close(saved, expected)
    assert not torch.allclose(saved, default), "the task's prompt, not the matting one, conditions the model"

    # scored like the paper's tables: every pair of the folder, binarised at 0.5
    report = tmp_path / "eval"
    assert evaluate.main(["--dataset", "folder", "--data-root", str(crack_task), "--checkpoint", str(out),
                          "--output", str(report), "--processing_res", "32", "--device", "cpu",
                          "--no_progress"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["num_samples"] == 20
    assert all(0.0 <= summary[k] <= 1.0 for k in ("iou", "pixel_acc", "dice"))

