"""finetune: pretrained model + task data -> fine-tuned model (outputs/finetune/model).

`finetune=sft` instruction-tunes on chat pairs; `finetune=classify` trains a sequence
classifier on WordNet glosses; `finetune=preference` optimises preferences (DPO family,
SimPO) on pairs of a chosen and a rejected reply, and `finetune=kto` on replies judged one at
a time; `finetune=rejection_sampling` fine-tunes on the model's own verified replies over
rounds (every round but the last into a cached model of its own; samples.parquet holds
every round's judged samples), `finetune=self_correction` on its own verified revisions
after the verifier's words back, likewise, and `finetune=grpo` by online RL from the answer
checker's reward. Those that learn from the model's own replies may start with SFT steps of
their own (`finetune.<task>.sft_steps`). Any of them can train peft adapters (merged before
saving) or freeze the lower layers. The training examples are first selected
(`finetune.selection`); selection.parquet says why each was kept or dropped, and
pairs.parquet holds the preference pairs with the reference's log-probs. Early stopping
on the validation loss; the best weights become the model. Resumable like pretrain.
Returns the best validation loss, the objective of a Hydra sweep.
"""

import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.evaluation.lm_metrics import perplexity
from lmpipe.evaluation.plots import selection_figures
from lmpipe.runs import atomic, lineage
from lmpipe.runs.keys import directory_digest, key_of
from lmpipe.runs.processes import DistEnv
from lmpipe.runs.tracking import MetricLogger
from lmpipe.selection.run import CACHE_DIR, select_for_task
from lmpipe.stage import Stage, prepare_cli
from lmpipe.taskdata.pairs import pairs_table
from lmpipe.tasks.base import FinetuningTask, TrainingSetup
from lmpipe.tasks.finetuning import checked_task, prepare_finetuning
from lmpipe.tasks.preference import PAIRS_FILE
from lmpipe.tasks.rejection_sampling import SAMPLES_FILE, samples_table
from lmpipe.training import distributed
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.loop import TrainResult, seed_everything, setup_hardware, train
from lmpipe.training.model import save_model

log = logging.getLogger(__name__)

# The SFT phase before preference optimisation: its model (and checkpoints), per config and
# starting model, outside DVC's outs, so a change of beta or lr does not retrain it.
SFT_PHASE_DIR = "finetune/sft-phase"
# The rounds before the last (rejection sampling): their models, likewise.
ROUNDS_DIR = "finetune/rounds"


def run_training(
    stage: Stage,
    f: DictConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    env: DistEnv,
    device: torch.device,
    metrics: MetricLogger,
    checkpoints: Checkpoints | None,
    train_ids: Collection[str] | None = None,
    task: FinetuningTask | None = None,
) -> tuple[TrainingSetup, TrainResult]:
    """`f`'s task trained from `base` in the shared loop (with its adapters' step hook)."""
    setup = prepare_finetuning(f, base, tokenizer, stage.cfg.seed, device, env.rank,
                                     env.world_size, train_ids, task)  # fmt: skip
    result = train(
        setup.model,
        setup.batches,
        setup.config,  # f, with the step count of finetune.epochs
        stage.cfg.hardware,
        device,
        metrics,
        setup.evaluate,
        checkpoints=checkpoints,
        run_id=stage.run_id,
        env=env,
        desc=f"finetune ({f.task})",
        objective=setup.objective,
        step_hook=setup.adapters.step_hook if setup.adapters else None,
    )
    return setup, result


def training_phase(
    stage: Stage, f: DictConfig, base: Path, tokenizer: PreTrainedTokenizerBase, env: DistEnv,
    device: torch.device, home_dir: str, prefix: str, what: str,
    task: FinetuningTask | None = None, identity: Mapping[str, object] | None = None,
) -> Path:  # fmt: skip
    """`f`'s `task` trained from `base` into a model of its own under `home_dir`: the SFT
    phase before a task that learns from its own replies, or a round of one but the last.
    Cached per config, starting model and `identity` (what the task's data came from);
    resumable like any training. Its metrics go to MLflow under `prefix`."""
    c = stage.cfg
    settings = OmegaConf.to_container(f, resolve=True)
    key = distributed.broadcast_object(
        key_of({"seed": c.seed, "finetune": settings, "base": directory_digest(base),
                **(identity or {})}) if env.is_main else None
    )  # fmt: skip
    home = stage.inputs_root / home_dir / key
    model_dir = home / "model"
    if model_dir.is_dir():
        log.info("finetune: the %s's model from %s", what, model_dir)
        return model_dir
    log.info("finetune: %s, %d steps at lr %g, into %s", what, f.steps, f.optim.lr, home)
    metrics = MetricLogger(stage.run_id if env.is_main else None, prefix=prefix)
    checkpoints = Checkpoints(home / "checkpoints", key, env)
    setup, result = run_training(stage, f, base, tokenizer, env, device, metrics, checkpoints,
                                 task=task)  # fmt: skip
    metrics.close()
    tmp = atomic.temp_path(model_dir)
    save_model(setup.final_model(), tokenizer, tmp, env)
    if env.is_main:
        os.replace(tmp, model_dir)
        stage.log_metrics({f"{prefix}{k}": v for k, v in result.summary().items()})
    distributed.barrier()
    return model_dir


def prepared_round(
    stage: Stage, task: FinetuningTask, f: DictConfig, model: Path,
    tokenizer: PreTrainedTokenizerBase, env: DistEnv, device: torch.device, number: int,
) -> tuple[FinetuningTask, pd.DataFrame | None]:  # fmt: skip
    """The task made with the data `model` derives for round `number` (1 for a task without
    rounds), the round's figures logged at step = round."""
    c = stage.cfg
    prepared, table = task.prepare(f, model, tokenizer, device,
                                   stage.inputs_root / task.data_cache, env, c.hardware,
                                   c.seed)  # fmt: skip
    if table is not None:
        figures = task.round_metrics(table)
        stage.log_metrics({f"{task.name}/{k}": v for k, v in figures.items()}, step=number)
    return prepared, table


# finetune's outs for derived data, empty where the task derives none (DVC needs the file).
EMPTY_DATA = {PAIRS_FILE: lambda: pairs_table({}), SAMPLES_FILE: lambda: samples_table([])}


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    resume_keys = ("seed", "finetune")
    with Stage("finetune", cfg, upstream=("pretrain",), resume_keys=resume_keys) as stage:
        c, f = stage.cfg, stage.cfg.finetune
        device, env = setup_hardware(c.hardware)
        seed_everything(c.seed)
        start = stage.input("pretrain", "model")
        tokenizer = load_tokenizer(start)
        task = checked_task(c)
        sft_first = task.sft_first(f)
        if sft_first is not None:
            start = training_phase(stage, sft_first, start, tokenizer, env, device,
                                   SFT_PHASE_DIR, "sft_phase/", "SFT phase")  # fmt: skip
            seed_everything(c.seed)  # the phase after draws as it would without one
        # Rounds before the last (rejection sampling): each trains from the model its data
        # came from (or from `start`) into a cached model of its own.
        current, round_tables = start, []
        for number in range(1, task.rounds(f)):
            prepared, table = prepared_round(stage, task, f, current, tokenizer, env, device,
                                             number)  # fmt: skip
            round_tables.append(table)
            current = training_phase(
                stage, f, task.round_start(f, start, current), tokenizer, env, device,
                ROUNDS_DIR, f"round_{number}/", f"round {number}", prepared,
                {"round": number, "data_from": directory_digest(current)},
            )  # fmt: skip
            seed_everything(c.seed)
        task, table = prepared_round(stage, task, f, current, tokenizer, env, device,
                                     task.rounds(f))  # fmt: skip
        base = task.round_start(f, start, current)
        for name, empty in EMPTY_DATA.items():
            saved = task.saved_data([*round_tables, table]) if task.data_file == name else None
            (saved if saved is not None else empty()).to_parquet(stage.output(name), index=False)
        chosen = select_for_task(
            task, f, base, tokenizer, device, c.seed, stage.inputs_root / CACHE_DIR, env,
        )  # fmt: skip
        chosen.table.to_parquet(stage.output("selection.parquet"), index=False)
        stage.log_metrics(chosen.counts())
        for name, figure in selection_figures(chosen.table).items():
            stage.log_figure(figure, name)
        # What the model was tuned on, beside its DVC deps in the run's datasets.
        final = (stage.out_dir / "selection.parquet").resolve()  # its name once the stage ends
        stage.log_inputs([lineage.Input("outputs/finetune/selection.parquet", chosen.digest(),
                                        "selection", final.as_uri())])  # fmt: skip
        log.info("finetune: %d of %d training examples selected", len(chosen.selected_ids),
                 len(chosen.table))  # fmt: skip
        metrics = stage.metric_logger()
        setup, result = run_training(stage, f, base, tokenizer, env, device, metrics,
                                     stage.checkpoints, chosen.selected_ids, task)  # fmt: skip
        metrics.close()
        save_model(setup.final_model(), tokenizer, stage.output("model"), env)
        objective = result.best_val_loss if f.final_weights == "best" else result.val_loss
        summary = {**result.summary(), **setup.counts}
        if setup.objective.loss_is_per_token:
            summary["val_perplexity"] = perplexity(objective)
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return objective


if __name__ == "__main__":
    prepare_cli("finetune", distributed=True)
    main()
