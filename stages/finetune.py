"""finetune: pretrained model + task data -> fine-tuned model (outputs/finetune/model).

`finetune=sft` instruction-tunes on chat pairs; `finetune=classify` trains a sequence
classifier on WordNet glosses; `finetune=preference` optimises preferences (DPO family,
SimPO) on pairs of a chosen and a rejected reply, optionally after SFT steps of its own
(`finetune.preference.sft_steps`). Any of them can train peft adapters (merged before
saving) or freeze the lower layers. The training examples are first selected
(`finetune.selection`); selection.parquet says why each was kept or dropped, and
pairs.parquet holds the preference pairs with the reference's log-probs. Early stopping
on the validation loss; the best weights become the model. Resumable like pretrain.
Returns the best validation loss, the objective of a Hydra sweep.
"""

import logging
import os
from collections.abc import Collection
from pathlib import Path

import hydra
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
from lmpipe.tasks.preference import CACHE_DIR as PAIRS_CACHE_DIR
from lmpipe.tasks.preference import PAIRS_FILE
from lmpipe.training import distributed
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.loop import TrainResult, seed_everything, setup_hardware, train
from lmpipe.training.model import save_model

log = logging.getLogger(__name__)

# The SFT phase before preference optimisation: its model (and checkpoints), per config and
# starting model, outside DVC's outs, so a change of beta or lr does not retrain it.
SFT_PHASE_DIR = "finetune/sft-phase"


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


def sft_phase(
    stage: Stage, f: DictConfig, base: Path, tokenizer: PreTrainedTokenizerBase, env: DistEnv,
    device: torch.device,
) -> Path:  # fmt: skip
    """The task's SFT phase `f` (lmpipe.tasks FinetuningTask.sft_first) from `base`: the
    model the task then starts from (and takes as its reference). Cached per config and
    starting model; resumable like any training."""
    c = stage.cfg
    settings = OmegaConf.to_container(f, resolve=True)
    identity = {"seed": c.seed, "finetune": settings,
                "base": directory_digest(base) if env.is_main else None}  # fmt: skip
    key = distributed.broadcast_object(key_of(identity) if env.is_main else None)
    home = stage.inputs_root / SFT_PHASE_DIR / key
    model_dir = home / "model"
    if model_dir.is_dir():
        log.info("finetune: the SFT phase's model from %s", model_dir)
        return model_dir
    log.info("finetune: SFT phase, %d steps at lr %g, into %s", f.steps, f.optim.lr, home)
    metrics = MetricLogger(stage.run_id if env.is_main else None, prefix="sft_phase/")
    checkpoints = Checkpoints(home / "checkpoints", key, env)
    setup, result = run_training(stage, f, base, tokenizer, env, device, metrics, checkpoints)
    metrics.close()
    tmp = atomic.temp_path(model_dir)
    save_model(setup.final_model(), tokenizer, tmp, env)
    if env.is_main:
        os.replace(tmp, model_dir)
        stage.log_metrics({f"sft_phase/{k}": v for k, v in result.summary().items()})
    distributed.barrier()
    return model_dir


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    resume_keys = ("seed", "finetune")
    with Stage("finetune", cfg, upstream=("pretrain",), resume_keys=resume_keys) as stage:
        c, f = stage.cfg, stage.cfg.finetune
        device, env = setup_hardware(c.hardware)
        seed_everything(c.seed)
        base = stage.input("pretrain", "model")
        tokenizer = load_tokenizer(base)
        task = checked_task(c)
        sft_first = task.sft_first(f)
        if sft_first is not None:
            base = sft_phase(stage, sft_first, base, tokenizer, env, device)
            seed_everything(c.seed)  # the preference phase draws as it would without one
        task, pairs = task.prepare(f, base, tokenizer, device, stage.inputs_root /
                                   PAIRS_CACHE_DIR, env, c.hardware, c.seed)  # fmt: skip
        (pairs if pairs is not None else pairs_table({})).to_parquet(
            stage.output(PAIRS_FILE), index=False
        )
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
