"""EleutherAI's lm-evaluation-harness as an evaluator (`evaluate.harness.tasks`), offline.

Our models run through the harness's own HF model class (`lm_eval.models.huggingface.
HFLM`) on the task YAMLs shipped in `harness_tasks/`, which read our packaged data:
- `lmpipe_wikitext2`: WikiText-2 test by article (word and byte perplexity, bits per byte);
- `lmpipe_reasoning_gym`: the run's reasoning-gym test split, greedy through the chat
  template, exact match;
- `lmpipe_trec`: TREC's test questions as multiple choice over the six types.
Any other harness task reads its data from the Hugging Face hub: refused by name unless
`evaluate.harness.allow_hub` is set (and the hub is reachable).

lm-eval is the optional extra `harness` (pinned in requirements.lock).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmpipe.evaluation.harness_tasks import lmpipe_tasks
from lmpipe.runs.config import ConfigError

log = logging.getLogger(__name__)

TASKS_DIR = Path(lmpipe_tasks.__file__).parent  # the YAMLs beside their functions
OFFLINE_TASKS = ("lmpipe_wikitext2", "lmpipe_reasoning_gym", "lmpipe_trec")
CHAT_TASKS = ("lmpipe_reasoning_gym",)  # prompted through the model's chat template
KEY = "evaluate.harness.tasks"


def _task_manager(finetune: Mapping[str, Any], tasks: Sequence[str]) -> Any:
    """The harness's task index with our YAMLs; its own thousands of tasks (a ~20 s scan)
    only where `tasks` names one of them."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"{KEY}: lm-evaluation-harness is not installed (pip install "
                          "'lmpipe[harness]', or `make install`)") from err  # fmt: skip
    return TaskManager(include_path=str(TASKS_DIR),
                       include_defaults=not set(tasks) <= set(OFFLINE_TASKS),
                       metadata={"lmpipe_finetune": dict(finetune)})  # fmt: skip


def check_tasks(tasks: Sequence[str], allow_hub: bool, manager: Any = None) -> None:
    """ConfigError for a task the harness does not know, or one that needs the hub (the
    network) while `allow_hub` is off; says which tasks run offline."""
    if set(tasks) <= set(OFFLINE_TASKS):
        _task_manager({}, tasks)  # the harness is installed
        return
    known = set((manager or _task_manager({}, tasks)).all_tasks)
    for task in tasks:
        if task in OFFLINE_TASKS:
            continue
        if task not in known:
            raise ConfigError(f"{KEY}: unknown harness task {task!r} (offline: "
                              f"{', '.join(OFFLINE_TASKS)})")  # fmt: skip
        if not allow_hub:
            raise ConfigError(f"{KEY}: {task!r} downloads its data from the Hugging Face hub, "
                              "which needs the network; the offline tasks are "
                              f"{', '.join(OFFLINE_TASKS)} (evaluate.harness.allow_hub=true "
                              "to try the hub)")  # fmt: skip


def flat_metrics(results: Mapping[str, Mapping[str, Any]], label: str) -> dict[str, float]:
    """`<label>_harness_<task>_<metric>` (and `..._stderr`) from the harness's results, its
    `<metric>,<filter>` keys with the default filter's name dropped."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            if not math.isnan(value):
                flat[f"{label}_harness_{task}_{metric}{suffix}"] = float(value)
    return flat


def run_harness(
    models: Mapping[str, Path],
    tasks: Sequence[str],
    finetune: Mapping[str, Any],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    device: str = "cpu",
    allow_hub: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Each model directory of `models` (label -> path, with its tokenizer) on `tasks`
    through the harness's HFLM: flat metrics for MLflow and the harness's results per label."""
    if not allow_hub:  # our tasks read packaged files; nothing may reach for the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = _task_manager(finetune, tasks)
    check_tasks(tasks, allow_hub, manager)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    metrics: dict[str, float] = {}
    raw: dict[str, Any] = {}
    for label, path in models.items():
        model = HFLM(pretrained=str(path), tokenizer=str(path), device=device,
                     dtype="float32", batch_size=batch_size)  # fmt: skip
        raw[label] = {}
        for chat, group in ((False, [t for t in tasks if t not in CHAT_TASKS]),
                            (True, [t for t in tasks if t in CHAT_TASKS])):  # fmt: skip
            if not group:
                continue
            log.info("harness: %s on %s%s", label, ", ".join(group), " (chat)" if chat else "")
            out = lm_eval.simple_evaluate(
                model=model, tasks=list(group), task_manager=manager, limit=limit,
                apply_chat_template=chat, gen_kwargs={"max_gen_toks": max_new_tokens},
                log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0,
            )  # fmt: skip
            raw[label] |= {task: {key: value for key, value in values.items()
                                  if isinstance(value, int | float | str)}
                           for task, values in out["results"].items()}  # fmt: skip
        metrics |= flat_metrics(raw[label], label)
    return metrics, raw
