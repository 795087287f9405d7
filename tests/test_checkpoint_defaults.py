"""Checkpoint defaults a long run can live with: the newest 3 checkpoints kept, the inference folder written into
every 3rd checkpoint only, the final model exported once (into --output_dir, not also into the last checkpoint),
and a run resumed from a checkpoint without an inference folder goes on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_depth
from d3 import training
from d3.training import build_parser
from d3.training_checkpoints import checkpoint_exports

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.mark.quick
def test_help_shows_the_checkpoint_defaults():
    text = " ".join(build_parser(train_depth.RECIPE).format_help().split())
    for flag in ("--checkpoints_total_limit", "--export_every"):
        entry = re.search(rf"{flag} [A-Z_]+ (.*?\(default: [^)]*\))", text)  # its help entry, not the usage line
        assert entry and entry.group(1).endswith("(default: 3)"), entry and entry.group(1)
    assert "(0: all)" in text and "(0: none)" in text
    args = build_parser(train_depth.RECIPE).parse_args([])
    assert (args.checkpoints_total_limit, args.export_every) == (3, 3)


@pytest.mark.quick
@pytest.mark.parametrize("every, expected", [(3, [3, 6]), (1, [1, 2, 3, 4, 5, 6]), (0, [])])
def test_which_checkpoints_carry_the_inference_folder(every, expected):
    args = SimpleNamespace(checkpointing_steps=100, export_every=every, max_train_steps=700)
    assert [s // 100 for s in range(100, 701, 100) if checkpoint_exports(s, args)] == expected  # never the last


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from d3.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("ckpt-defaults") / "data", 4, 32, 32, seed=4,
                                   tasks=("depth",))


def run(backbone: Path, data: Path, out: Path, steps: int, *extra: str):
    argv = ["--pretrained_model_name_or_path", str(backbone), "--dataset", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1", "--lr_warmup_steps", "0",
            "--report_to", "none", "--dataloader_num_workers", "0", *extra]
    return training.train(build_parser(train_depth.RECIPE).parse_args(argv), train_depth.RECIPE)


def test_defaults_keep_three_checkpoints_export_every_third_and_the_end_once(tiny_backbone_dir, data, tmp_path,
                                                                              monkeypatch, capsys):
    exported: list[str] = []
    real = training.export_predictor

    def counting(path, *rest, **kw):
        exported.append(Path(path).name)
        real(path, *rest, **kw)

    monkeypatch.setattr(training, "export_predictor", counting)
    out = tmp_path / "run"
    run(tiny_backbone_dir, data, out, 7)
    # checkpoints 1..7: the inference folder goes into 3 and 6 (written under their .tmp names), the final model into
    # the output folder alone; the newest 3 checkpoints stay, so 3 went with its checkpoint
    assert exported == [".checkpoint-3.tmp", ".checkpoint-6.tmp", "run"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6", "checkpoint-7"]
    has_export = {p.name: (p / "d3_config.json").is_file() for p in out.glob("checkpoint-*")}
    assert has_export == {"checkpoint-5": False, "checkpoint-6": True, "checkpoint-7": False}
    assert all((out / f"checkpoint-{s}" / "training_state" / "trainer_state.json").is_file() for s in (5, 6, 7))
    assert (out / "d3_config.json").is_file() and (out / "unet").is_dir()

    # resuming from the last checkpoint, which holds no inference folder, goes on; the oldest is dropped
    exported.clear()
    run(tiny_backbone_dir, data, out, 8, "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoint-7'} at step 7" in capsys.readouterr().out
    assert exported == ["run"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    state = json.loads((out / "checkpoint-8" / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
