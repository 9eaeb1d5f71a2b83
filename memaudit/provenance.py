"""Provenance: what an auditor needs to check an audit ran on the same inputs and software."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from memaudit.schema._audit import FileDigest

PACKAGES = ("memaudit", "torch", "torchvision", "timm", "transformers", "numpy", "captum")


def digest(path: str | os.PathLike[str] | None) -> FileDigest | None:
    """SHA-256 of a file (of every file, in name order, for a directory); None if absent."""
    if path is None:
        return None
    root = Path(path)
    if not root.exists():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    sha = hashlib.sha256()
    size = 0
    for file in files:
        if root.is_dir():
            sha.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
                size += len(block)
    return FileDigest(path=str(root), sha256=sha.hexdigest(), bytes=size)


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python and the installed versions of ``packages`` (missing ones omitted)."""
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
