"""Replace files and directories so that one complete version exists at every instant.

A new version is written under `.tmp-<id>-<name>` and renamed into place; the previous one
is first renamed to `.old-<id>-<name>` and deleted last. After a kill (SIGKILL, power
loss) `recover` deletes temp copies and puts back an old copy whose replacement never
arrived. Stage outputs and training checkpoints both go through here.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def temp_path(final: Path) -> Path:
    """Where to write the next version of `final` (same directory, so rename is atomic)."""
    return final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")


def write_file(final: Path, write: Callable[[Path], object]) -> None:
    """Write one file through a temp file and a single rename: a reader (another process
    of a sweep) sees the previous version or the new one, never half of one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    write(tmp)
    os.replace(tmp, final)


def replace(final: Path, tmp: Path) -> None:
    """Move `tmp` to `final`, the previous `final` aside first and deleted last."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{uuid.uuid4().hex[:8]}-{final.name}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        remove(old)


def recover(directory: Path) -> None:
    """Tidy up what a killed `replace` or writer left in `directory`."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        prefix, _, rest = path.name.partition("-")
        if prefix not in (".tmp", ".old") or "-" not in rest:
            continue
        final = directory / rest.split("-", 1)[1]
        if prefix == ".old" and not (final.exists() or final.is_symlink()):
            log.warning("restoring %s from an interrupted run", final)
            path.rename(final)
        else:
            log.warning("removing %s left by an interrupted run", path)
            remove(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
