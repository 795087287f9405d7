"""Console commands installed with the package (``pip install .``; see ``[project.scripts]`` in pyproject.toml).

| command           | same as                          |
|-------------------|----------------------------------|
| ``d3-infer``        | ``python infer.py``                |
| ``d3-evaluate``     | ``python evaluate.py``             |
| ``d3-convert``      | ``python -m d3.convert``           |
| ``d3-tiny``         | ``python -m d3.tiny``              |
| ``d3-synthetic``    | ``python -m d3.data.synthetic``    |
| ``d3-prepare``      | ``python -m d3.prepare``           |
| ``d3-pseudo-label`` | ``python -m d3.pseudo_label``      |

Each function takes an optional argument list (default: ``sys.argv[1:]``) and returns the exit status. The modules are
imported only when their command runs, so ``d3-tiny --help`` does not pay for loading the evaluation code.
"""

from __future__ import annotations

from collections.abc import Sequence


def _argv(argv: Sequence[str] | None) -> list[str] | None:
    return None if argv is None else list(argv)


def infer(argv: Sequence[str] | None = None) -> int:
    from d3._scripts.infer import main

    return main(_argv(argv))


def evaluate(argv: Sequence[str] | None = None) -> int:
    from d3._scripts.evaluate import main

    return main(_argv(argv))


def convert(argv: Sequence[str] | None = None) -> int:
    from d3.convert import main

    return main(_argv(argv))


def tiny(argv: Sequence[str] | None = None) -> int:
    from d3.tiny import main

    main(_argv(argv))
    return 0


def synthetic(argv: Sequence[str] | None = None) -> int:
    from d3.data.synthetic import main

    main(_argv(argv))  # returns the folder written; the command's status is 0
    return 0


def prepare(argv: Sequence[str] | None = None) -> int:
    from d3.prepare.__main__ import main

    return main(_argv(argv))


def pseudo_label(argv: Sequence[str] | None = None) -> int:
    from d3.pseudo_label import main

    return main(_argv(argv))
