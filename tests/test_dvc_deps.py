"""dvc.yaml's deps cover every module a stage runs: the closure of each stage's imports inside
src/lmpipe (and the YAML configs beside them), less the bookkeeping its header names as
unable to change a stage's outputs.
A module missing from a stage's deps means an edit to it would not rerun the stage."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
# dvc.yaml's header: shared bookkeeping that cannot change what a stage produces.
BOOKKEEPING = ("lmpipe/stage.py", "lmpipe/runs/", "lmpipe/training/checkpoint.py",
               "lmpipe/training/host_memory.py", "lmpipe/__init__.py")  # fmt: skip
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The file of module `name` (a package's __init__.py), or None outside src/lmpipe."""
    base = SOURCE.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every lmpipe module `path` imports (at any depth, TYPE_CHECKING blocks excepted), with
    the packages Python imports on the way (lmpipe.taskdata for lmpipe.taskdata.trec)."""
    names: set[str] = set()
    stack = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{anchor}.{module}" if module else anchor
            names.add(module)
            # `from lmpipe.taskdata import trec` imports the submodule when there is one.
            names |= {f"{module}.{alias.name}" for alias in node.names}
    modules = set()
    for name in names:
        parts = name.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in modules if m.startswith("lmpipe") and _module_file(m)}


def _inert(path: Path) -> bool:
    """A package __init__ holding only a docstring and constants runs nothing that matters."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(node.value, ast.Constant)
        for node in body
    )


def _bookkeeping(path: Path) -> bool:
    return str(path.relative_to(SOURCE)).startswith(BOOKKEEPING)


def code_closure(entry: Path) -> set[Path]:
    """The files under src/lmpipe that running `entry` executes, bookkeeping excepted (its
    own imports are bookkeeping too, so they are not followed)."""
    seen: set[Path] = set()
    todo = [(entry, "stages")]
    while todo:
        path, package = todo.pop()
        for module in _imported_modules(path, package):
            found = _module_file(module)
            if found is None or found in seen or _bookkeeping(found):
                continue
            seen.add(found)
            todo.append((found, module if found.name == "__init__.py" else
                         module.rpartition(".")[0]))  # fmt: skip
    code = {path for path in seen if not _inert(path)}
    # Configs a module's library reads from beside it (the harness task YAMLs) run too.
    return code | {data for path in code for data in path.parent.glob("*.yaml")}


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_every_module_it_runs(stage: str) -> None:
    entry = ROOT / "stages" / f"{stage}.py"
    deps = [dep for dep in STAGES[stage]["deps"] if isinstance(dep, str)]
    assert f"stages/{stage}.py" in deps
    missing = sorted(str(p.relative_to(ROOT)) for p in code_closure(entry) if not _covered(p, deps))
    assert not missing, f"dvc.yaml: stage {stage} runs modules it does not depend on: {missing}"


def test_the_closure_follows_imports_through_packages_and_functions() -> None:
    closure = {str(p.relative_to(SOURCE)) for p in code_closure(ROOT / "stages" / "finetune.py")}
    # stages/finetune.py -> tasks/finetuning.py -> tasks/sft.py -> tasks/causal_lm.py (the
    # SFT loss), and a function-level import in tasks/preference.py.
    assert {"lmpipe/tasks/finetuning.py", "lmpipe/tasks/sft.py",
            "lmpipe/tasks/causal_lm.py"} <= closure  # fmt: skip
    assert not any(p.startswith(BOOKKEEPING) for p in closure)
    # Packages that hold only a docstring (or a version string) run nothing.
    assert not {"lmpipe/__init__.py", "lmpipe/tasks/__init__.py"} & closure


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_no_module_it_does_not_run(stage: str) -> None:
    """A stale entry (a module the stage stopped importing) reruns the stage for nothing."""
    closure = code_closure(ROOT / "stages" / f"{stage}.py")
    deps = [dep for dep in STAGES[stage]["deps"]
            if isinstance(dep, str) and dep.startswith("src/lmpipe/")]  # fmt: skip
    stale = [dep for dep in deps if not any(
        (ROOT / dep) == path or (ROOT / dep) in path.parents for path in closure)]  # fmt: skip
    assert not stale, f"dvc.yaml: stage {stage} depends on modules it does not run: {stale}"


def write_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's src/lmpipe deps in dvc.yaml as its closure, in order (a new or
    moved module): `python -m tests.test_dvc_deps`."""
    lines, out, stage, i = path.read_text().split("\n"), [], None, 0
    while i < len(lines):
        if lines[i].startswith("  ") and not lines[i].startswith("   ") and lines[i].endswith(":"):
            stage = lines[i].strip().rstrip(":")
        if lines[i].startswith("      - src/lmpipe/"):
            while i < len(lines) and lines[i].startswith("      - src/lmpipe/"):
                i += 1
            closure = code_closure(ROOT / "stages" / f"{stage}.py")
            out += sorted(f"      - {p.relative_to(ROOT)}" for p in closure)
            continue
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out))


if __name__ == "__main__":
    write_deps()
