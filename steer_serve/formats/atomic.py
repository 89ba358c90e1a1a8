"""Writing a directory so that readers see either the old one or the complete new one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory(target: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Build a directory with ``fill(tmp_dir)`` in a temporary sibling, then rename it to ``target``.

    An existing ``target`` is replaced only with ``overwrite=True``. If ``fill`` or the rename
    fails, the previous ``target`` (if any) is left intact and no temporary directory remains.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        fill(tmp)
        for entry in tmp.iterdir():
            if entry.is_file():
                _fsync(entry)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
