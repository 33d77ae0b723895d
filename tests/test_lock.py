"""requirements.lock pins every package the project installs; it must agree with
pyproject.toml, and the environment the tests run in must be the locked one."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

LOCK = REPO / "requirements.lock"
EXTRAS = ("data", "base", "dev")
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)")


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(r) for r in [*project["dependencies"], *(r for e in EXTRAS for r in extras[e])]
    ]


def makefile_torch() -> Version:
    match = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile pins torch exactly"
    return Version(match[1])


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    pins = locked()
    problems = []
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        version = makefile_torch() if name == "torch" else pins.get(name)
        if version is None:
            problems.append(f"{requirement} is not in requirements.lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: the lock pins {version}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_the_lock_leaves_torch_to_the_makefile_pin() -> None:
    """torch==2.13.0 is the CPU build here and the CUDA build on a GPU machine: the lock
    must not name a build (nor the CUDA wheels that come with one)."""
    pins = locked()
    assert "torch" not in pins
    # nvidia-ml-py is the pure-Python NVML binding MLflow's GPU monitor reads, no CUDA library.
    assert not [name for name in pins if name.startswith("nvidia-") and name != "nvidia-ml-py"]


def not_installed_as(pins: dict[str, Version], how: str) -> list[str]:
    """Each pinned package that is missing or installed at another version, in words."""
    different = []
    for name, version in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            different.append(f"{name}: not installed ({how} {version})")
            continue
        if installed != version:
            different.append(f"{name}: {installed} installed, {version} {how}")
    return different


def test_the_running_environment_is_the_locked_one() -> None:
    different = not_installed_as(locked(), "locked")
    assert not different, "run `make install` (or `make lock`):\n" + "\n".join(different)
    assert Version(importlib.metadata.version("torch")).base_version == str(makefile_torch())


def test_the_packages_installed_without_dependencies_are_the_pinned_ones() -> None:
    """The Makefile's NO_DEPS packages (data read as files) are outside the lock: pinned there."""
    match = re.search(r"^NO_DEPS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile lists its --no-deps packages in NO_DEPS"
    pins = {name: Version(version) for name, version in (p.split("==") for p in match[1].split())}
    different = not_installed_as(pins, "pinned")
    assert not different, "run `make install`:\n" + "\n".join(different)


def test_make_install_onto_the_systems_torch_makes_a_venv_of_its_own() -> None:
    """TORCH=system: a venv over PYTHON's site-packages, no torch installed (a +cpu wheel on
    the find-links cannot replace a CUDA build), its own stamp (the CPU install's stamp is
    not taken for it), and a venv made for the other torch is made again."""
    import subprocess

    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", "-B", "install", *args], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout  # fmt: skip

    system, own = dry("TORCH=system"), dry()
    assert "-m venv --system-site-packages .venv" in system
    assert "pip install -q torch" not in system and "lmpipe needs torch >= 2.11" in system
    assert "touch .venv/.installed-system-torch" in system
    assert f"pip install -q torch=={makefile_torch()}" in own
    assert "--system-site-packages" not in own
    assert f"touch .venv/.installed-torch-{makefile_torch()}" in own
    for recipe, wanted in ((system, "true"), (own, "false")):
        assert f'grep -q "^include-system-site-packages = {wanted}"' in recipe
        assert "rm -rf .venv" in recipe
