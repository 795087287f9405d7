"""The README's quick start, run as written there (fewer steps): the model trained through a tiny backbone whose VAE
was taught to draw depth beats its untrained self on held-out synthetic scenes, and infer.py writes colour maps.

The commands are parsed from the README's "Quick start" block, their /tmp/d3-* folders moved under the test's tmp
path, and each is run in this process through its script's `main` (the same argument parsing and code as the command
line, without a Python start-up per command). Also: the reader behind `evaluate.py --dataset synthetic`, and
`d3.tiny.teach_vae`'s determinism and reuse.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Fewer steps than the README (the test's time): the VAE's teaching and the student's training. Measured on a busy
# 2-core CPU: 100/100 held-out AbsRel 0.452 -> 0.283 (165 s); 60/80 0.429 -> 0.296 (131 s), too near the 0.7 bound.
TEST_STEPS = {"--teach_vae_steps": "100", "--max_train_steps": "100"}


def readme_quickstart() -> list[list[str]]:
    """The commands of the README's first bash block under "## Quick start", one per line (`#` comments and `export`
    lines dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [c for c in commands if c and c[0] != "export"]  # the thread setting: conftest sets one thread


def _entry(command: list[str]):
    """(main function, its argv) for one quick-start command."""
    if command[:2] == ["python", "-m"] and command[2] == "d3.tiny":
        from d3.tiny import main
        return main, command[3:]
    if command[:2] == ["python", "-m"] and command[2] == "d3.data.synthetic":
        from d3.data.synthetic import main
        return main, command[3:]
    if command[0] in ("python", "accelerate") and "train_depth.py" in command:  # python or accelerate launch
        import train_depth
        from d3.train_cli import main as train_main
        return (lambda argv: train_main(train_depth.RECIPE, argv)), command[command.index("train_depth.py") + 1:]
    if command[:2] == ["python", "infer.py"]:
        import infer
        return infer.main, command[2:]
    if command[:2] == ["python", "evaluate.py"]:
        import evaluate
        return evaluate.main, command[2:]
    raise AssertionError(f"a quick-start command this test does not know: {shlex.join(command)}")


def _localise(argv: list[str], tmp: Path) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in TEST_STEPS and arg != "0":  # 0 training steps: the untrained model, kept
            arg = TEST_STEPS[argv[i - 1]]
        # a path as the whole argument, or as a flag's value after "=" (--validation_dataset synthetic=/tmp/d3-...)
        out.append(re.sub(r"(^|=)/tmp/(d3-[\w-]+)", lambda m: m[1] + str(tmp / m[2]), arg))
    return out


def test_readme_quickstart_learns_depth(tmp_path, one_thread):
    commands = readme_quickstart()
    evaluations = []
    for command in commands:
        main, argv = _entry(command)
        argv = _localise(argv, tmp_path)
        if command[1] == "evaluate.py":
            argv += ["--no_progress", "--device", "cpu"]
        result = main(argv)
        if isinstance(result, int):  # infer.py and evaluate.py return their exit status
            assert result == 0, f"{shlex.join(command)} exited with {result}"
        if command[1] == "evaluate.py":
            output = Path(argv[argv.index("--output") + 1])
            evaluations.append(json.loads((output / "summary.json").read_text()))
    assert len(evaluations) == 2, "the quick start evaluates the untrained model, then the trained one"
    untrained, trained = evaluations
    assert untrained["num_samples"] == trained["num_samples"] == 16
    assert trained["abs_rel"] <= 0.7 * untrained["abs_rel"], (untrained["abs_rel"], trained["abs_rel"])
    assert trained["delta1"] > untrained["delta1"], (untrained["delta1"], trained["delta1"])
    infer_argv = _localise(next(c for c in commands if c[1] == "infer.py"), tmp_path)
    maps = sorted(Path(infer_argv[infer_argv.index("--output") + 1]).rglob("*_depth_colored.png"))
    assert len(maps) == 16, maps
    # it validates on the held-out scenes while it trains (docs/training.md, "Watching a run"): AbsRel falls in the log, the
    # pictures are under OUTPUT/validation/, and the last validation is the trained model's evaluate.py number
    train_argv = _localise(next(c for c in commands if "train_depth.py" in c and "--validation_dataset" in c), tmp_path)
    run = Path(train_argv[train_argv.index("--output_dir") + 1])
    logged = [json.loads(line) for line in (run / "validation" / "history.jsonl").read_text().splitlines()]
    first, last = logged[0]["values"]["synthetic"], logged[-1]["values"]["synthetic"]
    assert logged[0]["step"] == 0 and last["abs_rel"] < first["abs_rel"]
    assert abs(last["abs_rel"] - trained["abs_rel"]) <= 1e-6 * trained["abs_rel"]
    assert all((run / "validation" / f"step-{r['step']}" / "synthetic.png").exists() for r in logged)
    assert (run / "best" / "best.json").exists()


@pytest.mark.quick
def test_synthetic_reader(tmp_path):
    from d3.data.benchmarks import get_benchmark
    from d3.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "scenes", 3, 32, 40, seed=5, tasks=("depth",), invalid_fraction=0.2)
    bench = get_benchmark("synthetic", root)
    meta = json.loads((root / "d3_dataset.json").read_text())
    assert [e.rgb for e in bench.entries] == [f"rgb/scene_{i:05d}.png" for i in range(3)]
    assert (bench.min_depth, bench.max_depth) == (meta["min_depth"], meta["max_depth"])
    sample = bench[1]
    depth = np.load(root / "depth" / "scene_00001.npy")
    assert sample.rgb.shape == (32, 40, 3) and sample.gt.shape == (32, 40)
    np.testing.assert_array_equal(sample.gt, depth)
    np.testing.assert_array_equal(sample.valid, depth > 0)
    assert not sample.valid.all()


def test_teach_vae_is_deterministic_and_reused(tiny_backbone_dir, tmp_path, one_thread):
    from safetensors.torch import load_file

    from d3.tiny import TEACH_RECORD, teach_vae

    def weights(folder: Path) -> dict:
        return load_file(str(next((folder / "vae").glob("*.safetensors"))))

    a = teach_vae(tiny_backbone_dir, tmp_path / "a", 3, maps=("rgb", "depth"), num_scenes=4, batch_size=2,
                  encoder=True)
    b = teach_vae(tiny_backbone_dir, tmp_path / "b", 3, maps=("rgb", "depth"), num_scenes=4, batch_size=2,
                  encoder=True)
    wa, wb, w0 = weights(a), weights(b), weights(tiny_backbone_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa if k.startswith("encoder."))
    record = json.loads((a / TEACH_RECORD).read_text())
    assert record["steps"] == 3 and record["maps"] == ["rgb", "depth"] and record["encoder"] is True
    stamp = (a / TEACH_RECORD).stat().st_mtime_ns
    teach_vae(tiny_backbone_dir, a, 3, maps=("rgb", "depth"), num_scenes=4, batch_size=2, encoder=True)
    assert (a / TEACH_RECORD).stat().st_mtime_ns == stamp, "same settings: the taught folder is reused"
    teach_vae(tiny_backbone_dir, a, 4, maps=("rgb", "depth"), num_scenes=4, batch_size=2, encoder=True)
    assert json.loads((a / TEACH_RECORD).read_text())["steps"] == 4, "other settings: taught again"
    with pytest.raises(ValueError, match="maps"):
        teach_vae(tiny_backbone_dir, tmp_path / "c", 1, maps=("sky",))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("not a backbone")
    with pytest.raises(FileExistsError):
        teach_vae(tiny_backbone_dir, tmp_path / "d", 1)
    assert (tmp_path / "d" / "notes.txt").exists()
