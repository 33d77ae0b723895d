"""Lineage: what produced a run, and the walk from a registered model back to the raw corpus.

Every stage run records
- its DVC deps as MLflow dataset inputs: name = the path in dvc.yaml, digest = DVC's md5
  (the same value as in dvc.lock), context = the stage that produced the file, or `code`;
- the raw sources clean read (context `raw`), digested as they were read;
- `lmpipe.upstream.<stage>` tags: the runs whose outputs it read, taken from the run.json
  next to those outputs. DVC restores run.json with the outputs it skips as cached, so the
  tag names the run that really produced the files, not one that never ran.

`chain()` follows the upstream tags to the first stage; `lmpipe lineage` prints it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TAG_STAGE = "lmpipe.stage"
TAG_UPSTREAM = "lmpipe.upstream."
# Tags of a registered model version: `lmpipe.run.<stage>` for every stage of its chain.
TAG_VERSION_RUN = "lmpipe.run."
CONTEXT_TAG = "mlflow.data.context"
CODE = "code"
RAW = "raw"


@dataclass(frozen=True)
class Input:
    """One thing a run read: a DVC dep or a raw source."""

    name: str
    digest: str
    context: str  # the producing stage, `code` or `raw`
    uri: str


def dvc_deps(stage: str, root: Path) -> list[Input]:
    """The file deps of `stage` in `root`'s dvc.yaml with DVC's own md5s.

    Uses DVC's hashing (and its cache of file hashes), so each digest equals what dvc.lock
    records. Outside a DVC project, or for a stage dvc.yaml does not define (a test, a
    scratch run), there is nothing to record and the list is empty.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            # One parse of dvc.yaml and dvc.lock (ruamel: ~0.3 s each time, in every stage
            # process): repo.stage.collect() would parse both again.
            stages = repo.index.stages
            producers = {str(out.fs_path): s.name for s in stages for out in s.outs}
            named = [s for s in stages if s.name == stage]
            if len(named) != 1:
                log.info("no DVC stage '%s' in %s: no DVC deps recorded", stage, root)
                return []
            (dvc_stage,) = named
            inputs = [
                Input(
                    name=dep.def_path,
                    digest=dep.get_hash().value,
                    context=producers.get(str(dep.fs_path), CODE),
                    uri=Path(dep.fs_path).as_uri(),
                )
                for dep in dvc_stage.deps
                # params are logged as params; a missing dep fails the stage on its own
                if not isinstance(dep, ParamsDependency) and dep.exists
            ]
            # Data before code: the MLflow runs table shows the first input in its column.
            return sorted(inputs, key=lambda item: item.context == CODE)
    except DvcException as err:
        log.info("no DVC stage '%s' in %s (%s): no DVC deps recorded", stage, root, err)
        return []


def dataset_inputs(inputs: Iterable[Input]) -> list[DatasetInput]:
    """MLflow dataset inputs (metadata only: name, digest, where it lives)."""
    entities = []
    for item in inputs:
        source = (
            HTTPDatasetSource(item.uri)
            if item.uri.startswith(("http://", "https://"))
            else LocalArtifactDatasetSource(item.uri)
        )
        dataset = MetaDataset(source, name=item.name, digest=item.digest)
        entities.append(
            DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, item.context)])
        )
    return entities


def upstream_tags(run_ids: Mapping[str, str]) -> dict[str, str]:
    """Tags of a stage run naming the upstream runs (by stage) whose outputs it read."""
    return {f"{TAG_UPSTREAM}{stage}": run_id for stage, run_id in run_ids.items()}


# -- reading the chain back ----------------------------------------------------------------


@dataclass
class Node:
    stage: str
    run_id: str
    run: Run | None  # None: the run is not in this store (deleted, or another store)
    upstream: dict[str, str] = field(default_factory=dict)  # stage -> run id


def resolve(reference: str, client: MlflowClient) -> tuple[str, dict[str, str]]:
    """A run id, `models:/<name>/<version>` or `models:/<name>@<alias>` -> (run id, the model
    version's tags). A version registered by deploy names its chain in its tags."""
    if not reference.startswith("models:/"):
        return reference, {}
    target = reference.removeprefix("models:/")
    if "@" in target:
        name, alias = target.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in target:
        name, number = target.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        raise ValueError(f"{reference}: expected models:/<name>/<version> or <name>@<alias>")
    tags = dict(version.tags)
    run_id = tags.get(f"{TAG_VERSION_RUN}deploy") or version.run_id
    if not run_id:
        raise ValueError(f"{reference} has no run behind it")
    return run_id, tags


def chain(run_id: str, client: MlflowClient) -> list[Node]:
    """The run and every run upstream of it, upstream first (clean ... deploy). An upstream
    run missing from the store is kept as a node without a run, so the gap shows."""
    nodes: dict[str, Node] = {}
    pending: list[tuple[str, str | None]] = [(run_id, None)]
    while pending:
        current, stage = pending.pop()
        if current in nodes:
            continue
        try:
            run = client.get_run(current)
        except MlflowException:
            if stage is None:  # the run asked about: nothing to show
                raise
            nodes[current] = Node(stage, current, None)
            continue
        tags = run.data.tags
        upstream = {
            key.removeprefix(TAG_UPSTREAM): value
            for key, value in tags.items()
            if key.startswith(TAG_UPSTREAM)
        }
        nodes[current] = Node(tags.get(TAG_STAGE, "?"), current, run, upstream)
        pending.extend((parent, parent_stage) for parent_stage, parent in upstream.items())
    return _upstream_first(nodes)


def _upstream_first(nodes: dict[str, Node]) -> list[Node]:
    ordered: list[Node] = []
    placed: set[str] = set()

    def place(node: Node) -> None:
        if node.run_id in placed:
            return
        placed.add(node.run_id)
        for parent in sorted(node.upstream.values()):
            if parent in nodes:
                place(nodes[parent])
        ordered.append(node)

    for node in sorted(nodes.values(), key=lambda n: (n.run.info.start_time or 0) if n.run else 0):
        place(node)
    return ordered


def version_tags(run_id: str, client: MlflowClient) -> dict[str, str]:
    """Tags for a registered model version: the run of every stage that led to `run_id`."""
    return {f"{TAG_VERSION_RUN}{node.stage}": node.run_id for node in chain(run_id, client)}


def describe(nodes: list[Node]) -> str:
    """The chain as text: one block per run, with the runs and data it read."""
    lines: list[str] = []
    for node in nodes:
        if node.run is None:
            lines.append(f"{node.stage:<9} run {node.run_id}  (not in this store)")
            continue
        info, tags = node.run.info, node.run.data.tags
        extras = [f"dvc exp {tags['lmpipe.dvc_exp']}"] if tags.get("lmpipe.dvc_exp") else []
        if tags.get("mlflow.source.git.commit"):
            extras.append(f"git {tags['mlflow.source.git.commit'][:10]}")
        lines.append(f"{node.stage:<9} run {node.run_id}  {info.status}"
                     + (f"  ({', '.join(extras)})" if extras else ""))  # fmt: skip
        for parent_stage, parent in sorted(node.upstream.items()):
            lines.append(f"    from {parent_stage} run {parent}")
        for dataset_input in node.run.inputs.dataset_inputs if node.run.inputs else []:
            context = next((t.value for t in dataset_input.tags if t.key == CONTEXT_TAG), "")
            if context != CODE:  # source files: the git commit says which
                dataset = dataset_input.dataset
                lines.append(f"    read {dataset.name}  {dataset.digest}  [{context}]")
    return "\n".join(lines)


def lineage_text(reference: str, client: MlflowClient | None = None) -> str:
    """What `lmpipe lineage` prints for a run id or a models:/ URI."""
    client = client or MlflowClient()
    try:
        run_id, version_tags = resolve(reference, client)
        text = describe(chain(run_id, client))
    except MlflowException as err:
        raise ValueError(f"{reference}: {err.message}") from err
    if version_tags:
        gate = version_tags.get("gate_passed", "?")
        text = f"{reference} (gate passed: {gate}), produced by:\n{text}"
    return text
