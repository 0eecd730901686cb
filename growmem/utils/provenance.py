"""Where a result came from: package versions and the git commit, recorded in every results
file and run folder so that a number can be traced to the code and the releases that made it."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The packages whose behaviour a growmem result depends on.
PACKAGES = ("growmem", "torch", "transformers", "tokenizers", "safetensors", "numpy")

REPOSITORY = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    """Installed version of each of ``PACKAGES`` (None when one is not installed); an imported
    package's own ``__version__`` when it has one, which names the build (torch's
    ``2.14.1+cu130`` where the distribution says ``2.14.1``)."""
    versions = {}
    for name in PACKAGES:
        module_version = getattr(sys.modules.get(name), "__version__", None)
        try:
            versions[name] = str(module_version or metadata.version(name))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_commit() -> dict[str, str | bool | None]:
    """The commit of the growmem checkout this module runs from and whether its tracked files
    differ from it (``dirty``); both None outside a growmem git checkout (an installed wheel)."""
    if not (REPOSITORY / ".git").exists() or not (REPOSITORY / "growmem").is_dir():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance() -> dict:
    """Versions, commit and Python of this process: the block every results file records."""
    return {
        "versions": package_versions(),
        "git": git_commit(),
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` as JSON atomically (a reader sees the old or the new
    file), with a ``provenance`` block first.

    Args:
        path: the file to (re)write; its folder is created.
        payload: JSON-serialisable results (a ``provenance`` key in it is replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
