"""The base classes of the tasks: pretraining and fine-tuning objectives.

The training loop sees a task only as an `Objective` (lmpipe.training.loop): the summed
loss of a micro-batch and how many prediction targets it holds. The loop divides every
micro-batch's sum by the target count of the whole global batch (all micro-batches, all
processes), so every target weighs the same however accumulation and processes split the
batch. Beyond that a task gives its data and batches (`TrainingSetup`), and, for
fine-tuning, its held-out predictions and their scores. A new objective is a new module
here, never a loop branch.

A fine-tuning task also declares, in its own module, what the rest of the code would
otherwise keep in tables: its name, the datasets it reads (`datasets`, loaded by `splits`),
the config rules beyond the schema (`check`), its deploy gate's metric and mode, how its
served model is called (`serving`, `serve`) and its loader (`load`).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.evaluation.metric_kinds import direction
from lmpipe.runs import atomic
from lmpipe.runs.config import (
    NO_BASELINE,
    ConfigError,
    DeployConfig,
    EvaluateConfig,
    FinetuneConfig,
    GateConfig,
    HardwareConfig,
    PretrainConfig,
)
from lmpipe.runs.processes import DistEnv
from lmpipe.selection.candidates import Candidate
from lmpipe.training import distributed
from lmpipe.training.adapters import Adapters
from lmpipe.training.loop import EvalFn, Objective, autocast, computed_as_policy

if TYPE_CHECKING:  # matplotlib only where a stage draws: it costs 0.4 s at every start
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def cached_table(
    path: Path, build: Callable[[], pd.DataFrame], env: DistEnv, what: str
) -> pd.DataFrame:
    """Data a task derives from its starting model, read from the cache file `path`, or
    built there by `build`: every process calls it (its model passes are shared out with
    `distributed.map_batches`), the main process writes the table, and every process then
    reads the same file."""
    missing = distributed.broadcast_object(not path.is_file() if env.is_main else None)
    if missing:
        table = build()
        if env.is_main:
            atomic.write_file(path, lambda tmp: table.to_parquet(tmp, index=False))
    elif env.is_main:
        log.info("%s from the cache %s", what, path)
    distributed.barrier()  # the main process wrote the table: every process reads it
    return pd.read_parquet(path)


def reference_by_split(
    model: PreTrainedModel,
    hardware: HardwareConfig,
    device: torch.device,
    encoded: Mapping[str, Sequence[Any]],
    compute: Callable[[torch.nn.Module, Sequence[Any]], list[Any]],
) -> dict[str, list[Any]]:
    """`compute(reference, examples)` for every split, the frozen starting `model` set up and
    run as `train` runs the policy (`computed_as_policy`, under the training's autocast), so
    that the two agree at step 0: a preference or KTO reference's log-probs."""
    reference = computed_as_policy(model, hardware, device)
    with autocast(device, hardware.precision):
        return {split: compute(reference, examples) for split, examples in encoded.items()}


@dataclass
class TrainingSetup:
    """A model ready to train (adapters in place), its batches, objective and validation."""

    model: PreTrainedModel
    batches: Any  # ShuffledBatches, or a wrapper with the same `position`
    objective: Objective
    evaluate: EvalFn
    counts: dict[str, int] = field(default_factory=dict)
    adapters: Adapters | None = None
    # The finetune config to train with, its step count final (set by prepare_finetuning).
    config: FinetuneConfig | DictConfig | None = None

    def final_model(self) -> PreTrainedModel:
        """What gets saved: adapters merged into the weights, so it loads without peft."""
        return self.adapters.merged() if self.adapters else self.model


class PretrainingTask(Objective):
    """An objective that learns from the token stream (pretrain), chosen by model family."""

    family: ClassVar[str]  # model.family: decoder | encoder

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """The tokenizer with the special tokens the objective needs (before the model is
        built, so that its embeddings cover them)."""
        return tokenizer

    @staticmethod
    def val_span(p: PretrainConfig) -> int:
        """Tokens of the periodic validation set: the first eval_batches windows of val."""
        return p.eval_batches * p.batch_size * p.seq_len

    @abstractmethod
    def setup(
        self,
        p: PretrainConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingSetup:
        """Training batches and periodic validation for `model`."""

    @abstractmethod
    def baseline(
        self, p: PretrainConfig, tokenizer: PreTrainedTokenizerBase, train_tokens: np.ndarray,
        val_tokens: np.ndarray,
    ) -> dict[str, float]:  # fmt: skip
        """The unigram baseline on the periodic validation set: its first value is the loss
        the model's val loss is compared with."""

    @abstractmethod
    def load(self, path: Path) -> PreTrainedModel:
        """The model saved by pretrain."""

    @abstractmethod
    def corpus_loss(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        max_tokens: int,
        device: torch.device,
    ) -> tuple[float, int]:
        """Mean loss per target on the first `max_tokens` of `tokens`, and the target count."""


@dataclass
class Report:
    """What evaluate shows of a task beside its metrics: figures (PNG file name -> figure,
    also in MLflow) and MLflow tables (name -> rows)."""

    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def chosen(items: Sequence[Any], train_ids: Collection[str] | None) -> list[Any]:
    """The training items a selection kept (all of them without one), in data order."""
    if train_ids is None:
        return list(items)
    wanted = set(train_ids)
    kept = [item for item in items if item.id in wanted]
    if len(kept) != len(wanted):
        raise ValueError(f"{len(wanted) - len(kept)} selected example id(s) are not in the "
                         "training split: the selection is from other data")  # fmt: skip
    return kept


@dataclass(frozen=True)
class Serving:
    """How a task's served model is called (lmpipe.deploy.serving): each request row holds
    a text in `input_column`; a generating task answers one reply per row and takes
    generation params, any other one row of outputs shaped like `output_example`."""

    input_column: str
    generates: bool
    output_example: Any


@dataclass(frozen=True)
class SmokeRequest:
    """The one request every registered model answers after registration, and the answer
    its reply must give where one is checkable (None: none)."""

    text: str
    answer: str | None = None


class FinetuningTask(Objective):
    """A fine-tuning objective on a labelled dataset with fixed train/val/test splits.

    Each task's evaluation first writes its predictions (one row per held-out example); the
    metrics are computed from that table alone, so they can be recomputed and audited.
    """

    datasets: ClassVar[tuple[str, ...]]  # the finetune.dataset values `splits` reads
    # The deploy gate's metric (a key of evaluate's metrics.json), unless deploy.gates.<task>
    # sets its own, and its threshold where deploy.gates leaves it null. Its direction is
    # the metric's own (lmpipe.evaluation.metric_kinds), never the task's.
    gate_metric: ClassVar[str]
    gate_threshold: ClassVar[float | None]
    serving: ClassVar[Serving]

    # Whether the pretrained model itself can be scored on the task (a causal LM on replies:
    # yes; a classifier needs the head that tuning trains): evaluate then scores it too.
    before_tuning_is_comparable: ClassVar[bool] = False
    # Data `prepare` derives from the starting model (pairs, judged samples): the file of
    # finetune's outputs it is saved to, and where it is cached across runs (under outputs/,
    # outside DVC's outs); None: the task derives none.
    data_file: ClassVar[str | None] = None
    data_cache: ClassVar[str] = "finetune/derived-cache"

    def check(self, cfg: DictConfig) -> None:
        """The task's rules for the whole config beyond the schema's: a ConfigError that
        names the key (finetune, evaluate and deploy run it before anything else)."""
        f = cfg.finetune
        if f.dataset not in self.datasets:
            raise ConfigError(
                f"invalid value for 'finetune.dataset': {f.dataset!r} is not a {self.name} "
                f"dataset (allowed for finetune.task={self.name}: {self.datasets})"
            )

    def default_gate(self, f: FinetuneConfig | DictConfig | None) -> GateConfig:
        """The gate where deploy.gates.<task> leaves a field null, for the data `f` trains
        on (None: the task's general default): its metric, threshold, baseline, significance."""
        return GateConfig(self.gate_metric, threshold=self.gate_threshold)

    def gate(
        self, d: DeployConfig | DictConfig, f: FinetuneConfig | DictConfig | None = None
    ) -> GateConfig:
        """deploy.gates.<task> over the task's default gate for `f`'s data (a field left
        null takes the default; an explicit metric takes that metric's defaults). The mode
        is the metric's declared direction: a configured mode that contradicts it, or none
        for a metric that declares none, is a ConfigError naming the key."""
        key = f"deploy.gates.{self.name}"
        configured = GateConfig()
        if self.name in d.gates:
            configured = (OmegaConf.to_object(d.gates[self.name])
                          if isinstance(d, DictConfig) else d.gates[self.name])  # fmt: skip
        default = self.default_gate(f)
        if configured.metric and configured.metric != default.metric:
            default = GateConfig(configured.metric)  # another metric: no defaults of ours
        metric = default.metric
        declared = direction(metric)
        if configured.mode and declared and configured.mode != declared:
            raise ConfigError(
                f"invalid value for '{key}.mode': {configured.mode!r} contradicts {metric}, "
                f"whose better direction is {declared!r} (leave mode null)"
            )
        mode = configured.mode or declared
        if mode is None:
            raise ConfigError(f"'{key}.mode' must be set: metric {metric!r} declares no "
                              "direction (min: lower is better; max: higher)")  # fmt: skip

        def chosen_value(name: str) -> Any:
            value = getattr(configured, name)
            return getattr(default, name) if value is None else value

        baseline = chosen_value("baseline")
        return GateConfig(
            metric, mode, chosen_value("threshold"),
            None if baseline == NO_BASELINE else baseline, configured.margin,
            chosen_value("significance"),
        )  # fmt: skip

    @abstractmethod
    def serve(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[Any],
        params: Mapping[str, Any],
    ) -> list[str] | pd.DataFrame:
        """The served model's answer to `texts` (one per row; see `serving`)."""

    def sft_first(self, f: FinetuneConfig) -> FinetuneConfig | None:
        """The supervised fine-tuning to run before this task's own training (its model is
        the task's start, and its reference where it has one); None: none."""
        return None

    def saved_data(self, tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
        """What finetune saves to `data_file` of the tables `prepare` returned, one per round
        (the last round's by default)."""
        return tables[-1]

    def round_metrics(self, table: pd.DataFrame) -> dict[str, float]:
        """Figures of one round's table, logged at step = round under the task's name."""
        return {}

    def rounds(self, f: FinetuneConfig) -> int:
        """Rounds of `prepare` then training in one finetune stage, each round's data made by
        the model the round before trained (rejection sampling); 1 for most tasks."""
        return 1

    def round_start(self, f: FinetuneConfig, start: Path, current: Path) -> Path:
        """The model a round trains from: the model that made its data (`current`), or the
        stage's starting model `start`."""
        return current

    def supervised_task(self) -> FinetuningTask:
        """The task whose training split calibrates a compressed model and retrains it after
        pruning (deploy): itself, unless its objective needs more than the model and data."""
        return self

    def disables_dropout(self, f: FinetuneConfig) -> bool:
        """Whether training runs without dropout (adapters' included)."""
        return False

    def head_modules(self, model: PreTrainedModel) -> list[str]:
        """Modules new to the task (a classification head): trained in full under LoRA."""
        return []

    @abstractmethod
    def splits(self, f: FinetuneConfig) -> dict[str, list]:
        """train / val / test: the same split for finetune and evaluate."""

    def prepare(
        self,
        f: FinetuneConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        cache_dir: Path,
        env: DistEnv,
        hardware: HardwareConfig | None = None,
        seed: int = 0,
    ) -> tuple[FinetuningTask, pd.DataFrame | None]:
        """The task ready to train from the starting model `base`: a task whose data derive
        from that model (preference pairs) is returned made with that data (cached under
        `cache_dir`; `seed` draws any sampling), beside the table finetune saves of it;
        any other task is itself, and None."""
        return self, None

    def held_out(self, f: FinetuneConfig, finetune_dir: Path) -> FinetuningTask:
        """The task as evaluate and deploy score it, given finetune's outputs: its `splits`
        are the held-out data (a task made from data finetune derived reads it back)."""
        return self

    @abstractmethod
    def candidates(self, f: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]:
        """The training split's examples as data selection judges them (lmpipe.selection)."""

    def scoring_model(self, base: Path) -> PreTrainedModel:
        """The starting model that scores examples for selection: its backbone for the
        embeddings (a task with responses also needs its LM head, for IFD)."""
        return AutoModel.from_pretrained(str(base), use_safetensors=True, trust_remote_code=False)

    @abstractmethod
    def setup(
        self,
        f: FinetuneConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        train_ids: Collection[str] | None = None,
    ) -> TrainingSetup:
        """Load the model to tune from `base` and prepare its training data: the examples
        of `train_ids` (a selection), or the whole training split."""

    @abstractmethod
    def load(self, path: Path) -> PreTrainedModel:
        """The tuned model saved by finetune."""

    @abstractmethod
    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """One row per example of the test split, with each model's prediction (and the
        baselines', fitted on the train split)."""

    @abstractmethod
    def score(
        self, frame: pd.DataFrame, models: Sequence[str], splits: Mapping[str, list]
    ) -> dict[str, float]:
        """Metrics of each model (and of the baselines) from the predictions table."""

    @abstractmethod
    def report(
        self,
        frame: pd.DataFrame,
        metrics: Mapping[str, float],
        models: Sequence[str],
        e: EvaluateConfig,
    ) -> Report:
        """Figures and tables of the saved predictions."""

    def example_scores(self, frame: pd.DataFrame, metric: str) -> pd.DataFrame | None:
        """Metric `metric` per held-out example of the predictions table, as a score table
        (lmpipe.evaluation.paired: metric, direction, id, value, weight, cluster; the metric
        is sum(value) / sum(weight)) for the deploy gate's paired test; None: the metric is
        no such mean (macro-F1)."""
        return None

    def example_metrics(self, frame: pd.DataFrame) -> list[str]:
        """The fine-tuned model's metrics that have per-example scores in `frame`."""
        return []

    def example_table(self, frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame | None:
        """The score tables of `metrics` (each once; those without scores left out) as one
        table; None if none has any."""
        tables = [self.example_scores(frame, metric) for metric in dict.fromkeys(metrics)]
        found = [table for table in tables if table is not None]
        return pd.concat(found, ignore_index=True) if found else None

    def smoke_request(self, frame: pd.DataFrame, d: DeployConfig | DictConfig) -> SmokeRequest:
        """The request the registered model answers after registration: deploy's configured
        text, whose reply is not checked."""
        return SmokeRequest(d.smoke_prompt if self.serving.generates else d.smoke_text)
