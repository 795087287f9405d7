"""The repository is an installable package: a wheel with `d3` and its subpackages only, console commands that run,
and `import d3` from any directory, both from the wheel and from an editable install.

Everything is built offline from a copy of the sources (pip wheel / install with --no-index --no-build-isolation
--no-deps), so the work tree gets no build/ or egg-info folders. About 20 s on 2 cores.
"""

from __future__ import annotations

import configparser
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("d3-infer", "d3-evaluate", "d3-convert", "d3-tiny", "d3-synthetic", "d3-prepare", "d3-pseudo-label")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


pytestmark = pytest.mark.skipif(_setuptools_version() < (64,),
                                reason="building needs setuptools >= 64 (pyproject.toml's build requirement)")


def run(cmd, cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_env(**extra: str) -> dict:
    """No PYTHONPATH from the caller, and no repository on the path: the copy under test is what gets imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What `pip install .` reads: pyproject.toml, README.md, the package (its symlinks kept) and the two root
    scripts that d3/_scripts links to."""
    src = tmp_path_factory.mktemp("src") / "d3-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "infer.py", "evaluate.py"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "d3", src / "d3", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(PIP + ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source], cwd=out)
    wheels = list(out.glob("d3-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_package_and_the_commands(wheel):
    import d3

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        meta = zf.read(f"{dist_info}/METADATA").decode()
        infer_in_wheel = zf.read("d3/_scripts/infer.py")
        evaluate_in_wheel = zf.read("d3/_scripts/evaluate.py")

    assert {n.split("/")[0] for n in names} == {"d3", dist_info}, "only d3/ (no configs/, tests/, benchmarks/)"
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "d3").rglob("*.py") if "__pycache__" not in p.parts}
    assert expected - names == set(), "every module of d3 and its subpackages is in the wheel"
    # The links to the root scripts arrive as ordinary files with the scripts' code.
    assert infer_in_wheel == (ROOT / "infer.py").read_bytes()
    assert evaluate_in_wheel == (ROOT / "evaluate.py").read_bytes()

    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    scripts = dict(parser["console_scripts"])
    assert set(COMMANDS) <= set(scripts), scripts
    assert all(v.startswith("d3.cli:") for v in scripts.values())
    assert f"Version: {d3.__version__}" in meta
    for dep in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "scipy"):
        assert f"Requires-Dist: {dep}" in meta


@pytest.mark.quick
def test_installed_wheel_imports_from_anywhere_and_its_commands_run(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run(PIP + ["install", "--quiet", "--no-deps", "--no-index", "--target", target, wheel], cwd=tmp_path,
        env=clean_env(PIP_ROOT_USER_ACTION="ignore"))
    env = clean_env(PYTHONPATH=str(target))
    # Every command's --help, in one interpreter: each imports its module and builds its parser.
    check = textwrap.dedent(f"""
        import contextlib, io, sys
        import d3, d3.cli
        assert d3.__file__.startswith({str(target)!r}), d3.__file__
        for name, func in {[(c, c[3:].replace('-', '_')) for c in COMMANDS]!r}:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    getattr(d3.cli, func)(["--help"])
                except SystemExit as e:
                    assert e.code in (0, None), (name, e.code)
            assert "usage:" in out.getvalue(), (name, out.getvalue())
            print(name, "ok")
    """)
    proc = run([sys.executable, "-c", check], cwd=elsewhere, env=env)
    assert proc.stdout.split() == [w for c in COMMANDS for w in (c, "ok")]
    # One real console script end to end: exit status 0 (the function behind it returns a path, not a status).
    proc = run([target / "bin" / "d3-synthetic", "--output", tmp_path / "scenes", "--num_scenes", "1",
                "--height", "16", "--width", "16", "--quiet"], cwd=elsewhere, env=env)
    assert (tmp_path / "scenes" / "d3_dataset.json").is_file()


def running_site_packages() -> list[str]:
    """The package folders of the interpreter running the tests: a virtualenv's own (and the base interpreter's only
    if that virtualenv was made with them), or the base interpreter's when no virtualenv is active."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def venv_seeing_this_interpreter(venv: Path, cwd: Path) -> Path:
    """A fresh virtualenv whose Python sees the running interpreter's packages (pip, setuptools, d3's dependencies)
    through a .pth file, and nothing else: `venv --system-site-packages` would show the *base* interpreter's
    packages instead, which inside a virtualenv are not the ones installed for the tests (a base setuptools 65 has
    no bdist_wheel, and fails the editable build). Returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=cwd)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=cwd,
                  env=clean_env()).stdout.strip()
    (Path(purelib) / "d3_tests_parent.pth").write_text("".join(f"{d}\n" for d in running_site_packages()))
    return python


def test_the_test_venv_sees_the_running_interpreters_packages_not_the_base_ones(tmp_path):
    python = venv_seeing_this_interpreter(tmp_path / "venv", tmp_path)
    check = "import numpy, pip, setuptools; print(setuptools.__version__); print(setuptools.__file__)"
    version, where = run([python, "-c", check], cwd=tmp_path, env=clean_env()).stdout.split()
    import setuptools

    assert (version, where) == (setuptools.__version__, setuptools.__file__)


def test_editable_install_imports_from_anywhere(source, tmp_path):
    venv = tmp_path / "venv"
    python = venv_seeing_this_interpreter(venv, tmp_path)
    run([python, "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "-e", source], cwd=tmp_path, env=clean_env(PIP_ROOT_USER_ACTION="ignore"))
    for command in COMMANDS:
        assert (venv / "bin" / command).is_file(), command
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = textwrap.dedent("""
        import importlib.util, d3, d3._scripts.infer as infer
        print(d3.__file__)
        print(infer.__file__)
        print(importlib.util.find_spec("configs"), importlib.util.find_spec("tests"))
    """)
    lines = run([python, "-c", check], cwd=elsewhere, env=clean_env()).stdout.splitlines()
    assert lines[0] == str(source / "d3" / "__init__.py")  # the sources themselves, not a copy
    assert lines[1] == str(source / "d3" / "_scripts" / "infer.py")
    assert lines[2] == "None None"  # the repository root is not put on sys.path
