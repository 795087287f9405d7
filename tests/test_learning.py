"""Learning: a tiny D³ depth model trained on synthetic scenes for a few CPU minutes beats the untrained one on
held-out scenes (AbsRel after least-squares alignment), and its alignment loss goes down."""

from __future__ import annotations

import numpy as np

import train_depth
from d3.data.synthetic import render_scene
from d3.metrics import align_least_squares, depth_metrics
from d3.predictor import D3Predictor, predictor_from_backbone
from d3.training import build_parser, train

STEPS = 150


def heldout_absrel(predictor: D3Predictor, scenes) -> float:
    import torch

    preds = predictor.predict([s.rgb for s in scenes], processing_res=0, batch_size=8)
    values = []
    for pred, scene in zip(preds, scenes):
        gt = torch.from_numpy(scene.depth)
        mask = gt > 0
        aligned, _, _ = align_least_squares(torch.from_numpy(pred), gt, mask)
        values.append(float(depth_metrics(aligned.clamp_min(1e-6), gt, mask)["abs_rel"]))
    return float(np.mean(values))


def test_training_beats_the_untrained_model(tiny_backbone_dir, synthetic_train_dir, tmp_path):
    scenes = [render_scene(50_000 + i, 64, 64) for i in range(16)]  # never seen in training (its scenes use hashed seeds)
    before = heldout_absrel(predictor_from_backbone(tiny_backbone_dir, "depth", device="cpu"), scenes)
    args = build_parser(train_depth.RECIPE).parse_args([
        "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--dataset", str(synthetic_train_dir),
        "--output_dir", str(tmp_path / "run"), "--resolution", "64", "--train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--max_train_steps", str(STEPS), "--learning_rate", "3e-4",
        "--lr_warmup_steps", "0", "--checkpointing_steps", "100000", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "0",
    ])
    result = train(args, train_depth.RECIPE)
    after = heldout_absrel(D3Predictor.from_pretrained(result.output_dir, device="cpu"), scenes)
    assert after <= 0.7 * before, f"held-out AbsRel {before:.4f} -> {after:.4f}"
    align = [h["loss/align"] for h in result.history]
    assert len(align) == STEPS
    assert np.mean(align[-10:]) < align[0], f"L_agg {align[0]:.4f} -> {np.mean(align[-10:]):.4f}"
