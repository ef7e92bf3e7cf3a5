"""The CI check that fails on deprecations our version bounds would let us run into."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pydantic
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_warnings", ROOT / ".ci/check_warnings.py")
check = importlib.util.module_from_spec(_spec)
sys.modules["check_warnings"] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

THIRD_PARTY = "/somewhere/site-packages/torch/nn/modules/module.py"
# transformers 5.24's own words; the warning is attributed to torch's Module.__call__
TRANSFORMERS_CACHE = (
    "`past_key_values` is deprecated and will be removed in version 5.40.0 for "
    "`LlamaForCausalLM.forward`. Use `cache` instead."
)


def test_our_bounds_are_read_from_pyproject():
    bounds = check.dependency_bounds()
    assert Version("5.24") in bounds["transformers"]
    assert Version("6.0") not in bounds["transformers"]
    assert Version("3.0") not in bounds["ray"]
    assert "import-linter" in bounds  # the test extra counts too


def test_a_removal_inside_our_bounds_fails_even_when_the_package_is_not_named():
    bounds = check.dependency_bounds()
    verdict = check.judge(FutureWarning, TRANSFORMERS_CACHE, THIRD_PARTY, bounds)
    assert verdict.failed
    assert "5.40" in verdict.reason and "transformers" in verdict.reason


def test_a_removal_past_our_upper_bound_passes_and_without_the_bound_fails():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pydantic.Field(default=1, update_type="x")  # Ray Serve's deprecated use of pydantic
    (w,) = seen
    bounds = check.dependency_bounds()
    assert not check.judge(w.category, str(w.message), THIRD_PARTY, bounds).failed

    unbounded = {**bounds, "pydantic": SpecifierSet(">=2.6")}
    verdict = check.judge(w.category, str(w.message), THIRD_PARTY, unbounded)
    assert verdict.failed and "pydantic" in verdict.reason


def test_our_own_deprecated_call_fails_whatever_it_names():
    own = str(ROOT / "antiphon/actors/runner.py")
    verdict = check.judge(DeprecationWarning, "old_api is deprecated", own, {})
    assert verdict.failed and "own code" in verdict.reason


def test_a_removal_date_fails_and_a_warning_naming_no_removal_passes():
    bounds = check.dependency_bounds()
    dated = "this option is deprecated and will be removed after 2027-06-01"
    assert check.judge(DeprecationWarning, dated, THIRD_PARTY, bounds).failed
    vague = "this option is deprecated and will be removed in a future release"
    assert not check.judge(DeprecationWarning, vague, THIRD_PARTY, bounds).failed
