"""Where a run came from: the code's git commit and the versions of the packages that
computed it (recorded in each manifest)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("entropy-warehouse", "torch", "transformer-lens", "transformers", "datasets",
            "pyarrow", "numpy")


def git_commit() -> str | None:
    """The checkout's ``HEAD`` commit (``-dirty`` when tracked files changed), or None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def package_versions() -> dict:
    """Python's version and each of ``PACKAGES``' (None where not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
