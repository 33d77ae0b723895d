"""The package's folders are layers, and a layer imports only from itself and the layers
below it: runs/ (bookkeeping) at the bottom, then data/, taskdata/, evaluation/, training/,
feedback/ (the model's own replies and their verdicts), selection/, tasks/, deploy/, the
Stage harness (lmpipe/stage.py) that the stages/ entry points use, and the `lmpipe` command
(lmpipe/cli.py) on top."""

import ast
from pathlib import Path

import pytest

from lmpipe.tasks.finetuning import FINETUNING

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmpipe"
LAYERS = [
    "runs",
    "data",
    "taskdata",
    "evaluation",
    "training",
    "feedback",
    "selection",
    "tasks",
    "deploy",
    "stage",
    "cli",  # the `lmpipe` command: chores from every layer (params, lineage, serve)
]


def _layer(module: str) -> str:
    """lmpipe.<layer>[.module] -> layer."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every lmpipe module `path` imports, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmpipe"):
            if node.module == "lmpipe":  # from lmpipe import tasks
                found += [(node.lineno, f"lmpipe.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmpipe.")]
    return found


def test_every_module_sits_in_a_layer() -> None:
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top_level | folders == set(LAYERS)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_layers_import_only_downward(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    if relative.name == "__init__.py" and relative.parent == Path("."):
        return
    own = LAYERS.index(relative.parts[0].removesuffix(".py"))
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if LAYERS.index(_layer(module)) > own
    ]
    assert not upward, f"{relative} imports from a higher layer: {upward}"


TASK_NAMES = tuple(FINETUNING)  # sft, classify, preference, kto


def _task_name_tests(path: Path) -> list[str]:
    """Comparisons of a value with a task's name (`task == "classify"`, `f.task in (...)`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            names = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(n, ast.Constant) and n.value in TASK_NAMES for n in names):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in [*PACKAGE.rglob("*.py"), *(PACKAGE.parents[1] / "stages").glob("*.py")]
           if "tasks" not in p.relative_to(PACKAGE.parents[1]).parts),
    ids=lambda p: p.name,
)  # fmt: skip
def test_no_code_outside_tasks_branches_on_a_task_name(path: Path) -> None:
    """What differs by task is declared in the task's module (FinetuningTask: datasets,
    check, gate, serving), so nothing else tells tasks apart by name."""
    found = _task_name_tests(path)
    assert not found, f"{path.name} branches on a task's name: {found}"
