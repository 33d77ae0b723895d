"""The documentation: a README that is a landing page, and a configuration reference
generated from the schema that names every key's meaning and is never stale. (`make test`
also builds the site with `mkdocs build --strict`, which checks every link and anchor.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmpipe.runs import config_docs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys() -> list[config_docs.Key]:
    return config_docs.keys()


def test_every_config_key_has_a_description(keys: list[config_docs.Key]) -> None:
    assert len(keys) > 250
    assert config_docs.undocumented(keys) == []


def test_a_key_without_a_comment_is_reported(tmp_path: Path) -> None:
    source = "class A:\n    # Why a.\n    a: int = 1\n    b: int = 2  # why b\n    c: int = 3\n"
    comments = config_docs.field_comments(source)
    assert comments == {("A", "a"): "Why a.", ("A", "b"): "why b", ("A", "c"): ""}


def test_the_committed_reference_is_the_generated_one(keys: list[config_docs.Key]) -> None:
    committed = (ROOT / config_docs.REFERENCE).read_text()
    assert committed == config_docs.markdown(keys), (
        "docs/reference/configuration.md is stale: python -m lmpipe.runs.config_docs"
    )


def test_the_reference_gives_each_key_its_type_and_the_demos_default() -> None:
    page = (ROOT / config_docs.REFERENCE).read_text()
    assert "| `finetune.optim.lr` | `float` | `0.001` |" in page
    assert '| `evaluate.wikitext.form` | `str` | `"articles"` |' in page


def test_the_readme_is_a_landing_page_with_the_two_setup_commands() -> None:
    lines = (ROOT / "README.md").read_text().split("\n")
    assert len(lines) <= 300
    first_screen = "\n".join(lines[:20])
    assert "make demo" in first_screen and "make test" in first_screen
