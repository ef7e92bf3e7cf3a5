"""Import every module of antiphon and fail on a deprecation we would run into.

The suite makes any DeprecationWarning or FutureWarning an error, except a few that
third-party code raises about its own use of another library (pyproject.toml). This check
is the other half: it imports every antiphon module under the installed (locked) versions,
records every deprecation warning, and fails when

- the warning is attributed to antiphon's own code (our call must move), or
- it names a removal version that the version bounds in pyproject.toml still admit for the
  package it is about (a later install inside our bounds would break), or
- it names a removal date (we would pass it with the lock unchanged).

A warning that names no removal is printed and passes. Which package a warning is about:
the package of its category (pydantic's `PydanticDeprecatedSince20`), else a dependency the
message names, else unknown, and then every dependency's bounds are asked (the strict
reading: a warning we cannot place fails if any of our bounds admits its removal version).

Run: python .ci/check_warnings.py   (CI runs it after installing from the lock)
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import tomllib
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = Path(__file__).resolve().parents[1]
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

# "removed in version 5.40.0", "to be removed in V3.0", "removal in 3.0", "dropped in v2"
REMOVAL_VERSION = re.compile(
    r"(?:remov\w*|dropp\w*|delet\w*)\s+(?:\w+\s+){0,3}?"
    r"(?:in|from|by|with|after|before)\s+(?:version\s+|release\s+)?(?:[A-Za-z][\w-]*\s+)?"
    r"v?(\d+(?:\.\d+)*)",
    re.IGNORECASE,
)
REMOVAL_DATE = re.compile(r"(?:remov|dropp|delet)\w*\D{0,40}?(\d{4}-\d{2}(?:-\d{2})?)", re.I)


@dataclass(frozen=True)
class Verdict:
    failed: bool
    reason: str


def dependency_bounds(pyproject: Path = PROJECT / "pyproject.toml") -> dict[str, SpecifierSet]:
    """Our declared version bounds, by canonical package name (runtime and test extras)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    bounds = {}
    for line in lines:
        requirement = Requirement(line)
        bounds[canonicalize_name(requirement.name)] = requirement.specifier
    return bounds


def package_of(
    category: type[Warning], message: str, bounds: dict[str, SpecifierSet]
) -> str | None:
    """The dependency a warning is about, or None if it cannot be told."""
    top = category.__module__.partition(".")[0]
    if top != "builtins" and canonicalize_name(top) in bounds:
        return canonicalize_name(top)
    words = {canonicalize_name(w) for w in re.findall(r"[A-Za-z][\w-]*", message)}
    named = sorted(words & set(bounds))
    return named[0] if len(named) == 1 else None


def judge(
    category: type[Warning],
    message: str,
    filename: str,
    bounds: dict[str, SpecifierSet],
    own_root: Path = PROJECT / "antiphon",
) -> Verdict:
    """Whether one deprecation warning fails the check, and why."""
    if Path(filename).resolve().is_relative_to(own_root.resolve()):
        return Verdict(True, "raised by antiphon's own code: move off the deprecated call")
    date = REMOVAL_DATE.search(message)
    if date:
        return Verdict(True, f"names a removal date ({date.group(1)})")
    found = REMOVAL_VERSION.search(message)
    if not found:
        return Verdict(False, "names no removal")
    removal = Version(found.group(1))  # digits and dots: always a version
    package = package_of(category, message, bounds)
    asked = {package: bounds[package]} if package else bounds
    admitting = [name for name, spec in asked.items() if spec.contains(removal, prereleases=True)]
    if admitting:
        who = package or f"unknown package; bounds of {', '.join(admitting)} admit it"
        return Verdict(True, f"removal in {removal} ({who}) is inside our bounds: bound or move")
    return Verdict(False, f"removal in {removal} is outside our bounds of {package or 'all'}")


def import_everything() -> list[warnings.WarningMessage]:
    """Import antiphon and every module under it, recording every warning raised."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        package = importlib.import_module("antiphon")
        for module in pkgutil.walk_packages(package.__path__, "antiphon."):
            importlib.import_module(module.name)
    return seen


def main() -> int:
    bounds = dependency_bounds()
    seen = [w for w in import_everything() if issubclass(w.category, DEPRECATIONS)]
    # One line per distinct warning (Ray Serve raises the same one at a dozen fields).
    distinct = Counter((w.category, str(w.message), w.filename) for w in seen)
    failures = 0
    for (category, message, filename), count in distinct.items():
        verdict = judge(category, message, filename, bounds)
        failures += verdict.failed
        mark = "FAIL" if verdict.failed else "ok"
        print(f"{mark:4}  {category.__name__} x{count} from {filename}: {verdict.reason}")
        print(f"      {message.splitlines()[0][:160]}")
    print(f"{len(seen)} deprecation warnings on import ({len(distinct)} distinct): {failures} fail")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
