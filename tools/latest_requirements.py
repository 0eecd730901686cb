"""Print growmem's dependencies (and the extras named on the command line) without their upper
bounds, one per line, for `make test-latest`: the newest releases, so that a developer sees a
dependency's new release break growmem before a user does. Lower bounds stay.

Usage: python tools/latest_requirements.py [extra ...]
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*(.*)")


def unbounded(requirement: str) -> str:
    """``requirement`` with its upper-bound and exact-version specifiers dropped."""
    spec, _, marker = requirement.partition(";")
    name, rest = NAME.fullmatch(spec).groups()
    kept = [s.strip() for s in rest.split(",") if s.strip().startswith((">", "!="))]
    return name + ",".join(kept) + (f";{marker}" if marker else "")


def main(extras: list[str]) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        sys.exit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    for requirement in requirements:
        if not requirement.startswith("torch"):  # torch: the Makefile's TORCH variable
            print(unbounded(requirement))


if __name__ == "__main__":
    main(sys.argv[1:])
