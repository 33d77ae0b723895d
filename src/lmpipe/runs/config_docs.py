"""The configuration reference (docs/reference/configuration.md), generated from the schema:
every key of `LmpipeConfig` with its type, the default `conf/` composes to, and its meaning,
read from the comment on or above the key's line in lmpipe/runs/config.py (a key without
one is a documentation bug: `undocumented` lists them and a test fails on any).

    python -m lmpipe.runs.config_docs            # rewrite docs/reference/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import tokenize
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmpipe.runs import config

REFERENCE = Path("docs") / "reference" / "configuration.md"


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. finetune.optim.lr
    type: str
    default: Any  # as conf/ composes it (the demo's value)
    meaning: str
    group: str  # the schema class it belongs to
    group_doc: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, after the comment lines directly
    above it."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}  # fmt: skip
    lines = source.split("\n")
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(item.lineno, item.end_lineno + 1)
                        if n in comments and not lines[n - 1].lstrip().startswith("#")]  # fmt: skip
            text = " ".join(above + trailing).strip()
            found[(node.name, item.target.id)] = text
    return found


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text if not isinstance(hint, type) else hint.__name__


def _walk(cls: type, prefix: str) -> Iterator[tuple[str, type, dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, f"{prefix}{item.name}.")
        else:
            owner = next(c for c in cls.__mro__ if item.name in getattr(c, "__annotations__", {}))
            yield f"{prefix}{item.name}", owner, item, hint


def keys(composed: dict[str, Any] | None = None) -> list[Key]:
    """Every schema key, with the default of `composed` (conf/ composed with no overrides)."""
    comments = field_comments(Path(config.__file__).read_text())
    tree = OmegaConf.create(composed if composed is not None else default_config())
    out = []
    for name, owner, item, hint in _walk(config.LmpipeConfig, ""):
        default = OmegaConf.select(tree, name, default=None)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        meaning = comments.get((owner.__name__, item.name), "")
        out.append(Key(name, _type_name(hint), default, meaning, owner.__name__,
                       " ".join((owner.__doc__ or "").split())))  # fmt: skip
    return out


def default_config() -> dict[str, Any]:
    """The demo's configuration: params.yaml, conf/ composed with no overrides (`lmpipe
    check-params` and its test keep the committed file current)."""
    root = config.find_project_root()
    composed = OmegaConf.to_container(OmegaConf.load(root / config.PARAMS_FILE), resolve=False)
    composed.pop("conf_digest", None)
    return composed


def undocumented(all_keys: list[Key]) -> list[str]:
    return [key.name for key in all_keys if not key.meaning]


def markdown(all_keys: list[Key]) -> str:
    """The reference page: one table per top-level group, keys in schema order."""
    lines = ["# Configuration reference", "",
             "Every key of the pipeline's configuration: its type, the default `conf/` composes "
             "to (what `make demo` runs), and what it does. Set any of them with `dvc exp run "
             "-S key=value`, a Hydra override (`python -m stages.<stage> key=value`) or a file "
             "in `conf/`. Generated from the schema (`src/lmpipe/runs/config.py`) by "
             "`python -m lmpipe.runs.config_docs`; a test fails when a key has no description "
             "or this page is stale.", ""]  # fmt: skip
    group = None
    for key in all_keys:
        top = key.name.split(".")[0] if "." in key.name else "top level"
        if top != group:
            group = top
            lines += ["", f"## `{group}`" if group != "top level" else "## Top level", "",
                      "| key | type | default | meaning |", "|---|---|---|---|"]  # fmt: skip
        default = json.dumps(key.default) if key.default is not None else "null"
        cell = key.meaning.replace("|", "\\|")
        lines.append(f"| `{key.name}` | `{key.type.replace('|', '&#124;')}` | "
                     f"`{default.replace('|', '&#124;')}` | {cell} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(root: Path | None = None) -> Path:
    root = root or config.find_project_root()
    path = root / REFERENCE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(keys()))
    return path


if __name__ == "__main__":
    print(f"wrote {write()}")
