"""pyproject.toml makes a deprecation that the project's own code triggers an error in the tests, and leaves the
deprecations of third-party code alone (reported, not fatal): a check that this configuration is in force."""

from __future__ import annotations

import warnings

import pytest

pytestmark = pytest.mark.quick

WARN = compile("import warnings\nwarnings.warn('old API', CATEGORY, stacklevel=1)\n", "<attributed>", "exec")


def attributed_to(module: str, category: type[Warning]) -> None:
    """Raise `category` as if from code in `module` (warnings attribute a warning to the module of its frame)."""
    exec(WARN, {"__name__": module, "CATEGORY": category})


@pytest.mark.parametrize("module", ["d3.backbone", "d3.data.benchmarks", "d3", "infer", "train_depth"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, PendingDeprecationWarning])
def test_deprecations_from_project_code_are_errors(module, category):
    with pytest.raises(category):
        attributed_to(module, category)


@pytest.mark.parametrize("module", ["diffusers.models.modeling_utils", "d3x", "tests.test_warnings"])
def test_deprecations_from_other_code_are_not(module):
    with warnings.catch_warnings(record=True):
        attributed_to(module, DeprecationWarning)
