"""``python -m d3.prepare SOURCE --src RAW --dst OUT``: convert one raw release, resumably."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .. import flags
from . import SOURCES


def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="python -m d3.prepare",
        description="Convert a raw training release into the plain folder format the train scripts read. "
        "Re-running skips finished samples and scenes.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{" + ",".join(SOURCES) + "}")
    for name in SOURCES:
        module = importlib.import_module(f".{name}", __package__)
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0],
                           description=module.__doc__, formatter_class=flags.HelpFormatter)
        p.add_argument("--src", required=True, help="root of the raw release")
        p.add_argument("--dst", required=True, help="output folder (one source per folder)")
        p.add_argument("--workers", type=int, default=0, help="worker processes (0 = convert in this process)")
        module.add_arguments(p)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """The checks before any file is converted (FlagError naming the flag otherwise)."""
    flags.existing_path("--src", args.src, "no such folder", folder=True)
    flags.at_least("--workers", args.workers, 0)
    if Path(args.dst).exists() and not Path(args.dst).is_dir():
        raise flags.bad("--dst", args.dst, "is a file, not a folder")


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every planned sample exists afterwards, 1 when some failed (they are listed)."""
    args = flags.parse_checked(build_parser(), validate_args, argv)
    counts = importlib.import_module(f".{args.source}", __package__).run(args)
    return 1 if counts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
