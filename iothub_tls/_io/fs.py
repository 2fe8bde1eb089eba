"""Directories that hold keys and registries: created private to their owner."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["private_directory"]


def private_directory(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents with mode 0700, whatever the umask (under
    umask 000, ``mkdir(parents=True)`` makes them 0777: anyone could then list the
    keys, or swap a certificate for their own). Directories that exist are left as
    they are. Returns ``path``.

    :raises OSError: as ``Path.mkdir`` does (a parent is a file, no permission).
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            # 0700 & ~umask: 0700 under the usual umasks (000, 022, 027, 077).
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():
                raise
    return target
