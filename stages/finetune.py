"""finetune: pretrained model + task data -> fine-tuned model (outputs/finetune/model).

`finetune=sft` instruction-tunes on chat pairs; `finetune=classify` trains a sequence
classifier on WordNet glosses. Either can use LoRA (merged before saving) or freeze the
lower layers. The training examples are first selected (`finetune.selection`: dedup,
quality rules, IFD, diversity, budget); selection.parquet says why each was kept or
dropped. Early stopping on the validation loss; the best weights become the model.
Resumable like pretrain. Returns the best validation loss, the objective of a Hydra sweep.
"""

import logging

import hydra
from omegaconf import DictConfig

from lmpipe import tasks
from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.evaluation.lm_metrics import perplexity
from lmpipe.evaluation.plots import selection_figures
from lmpipe.runs import lineage
from lmpipe.selection.run import CACHE_DIR, select_for_task
from lmpipe.stage import Stage, prepare_cli
from lmpipe.training.loop import seed_everything, setup_hardware, train
from lmpipe.training.model import save_model

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> float:
    resume_keys = ("seed", "finetune")
    with Stage("finetune", cfg, upstream=("pretrain",), resume_keys=resume_keys) as stage:
        c, f = stage.cfg, stage.cfg.finetune
        device, env = setup_hardware(c.hardware)
        seed_everything(c.seed)
        base = stage.input("pretrain", "model")
        tokenizer = load_tokenizer(base)
        chosen = select_for_task(
            tasks.finetuning(f.task), f, base, tokenizer, device, c.seed,
            stage.inputs_root / CACHE_DIR, env,
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
        setup = tasks.prepare_finetuning(f, base, tokenizer, c.seed, device, env.rank,
                                         env.world_size, chosen.selected_ids)  # fmt: skip
        if f.epochs is not None:
            steps = tasks.steps_for_epochs(f, setup.batches.num_items, env.world_size)
            log.info("finetune: %s epochs of %d examples = %d steps", f.epochs,
                     setup.batches.num_items, steps)  # fmt: skip
            f.steps = steps
        metrics = stage.metric_logger()
        result = train(
            setup.model,
            setup.batches,
            f,
            c.hardware,
            device,
            metrics,
            setup.evaluate,
            checkpoints=stage.checkpoints,
            run_id=stage.run_id,
            env=env,
            desc=f"finetune ({f.task})",
            objective=setup.objective,
        )
        metrics.close()
        save_model(setup.final_model(), tokenizer, stage.output("model"), env)
        objective = result.best_val_loss if f.final_weights == "best" else result.val_loss
        summary = {**result.summary(), "val_perplexity": perplexity(objective), **setup.counts}
        stage.write_json("metrics.json", summary)
        stage.log_metrics(summary)
        return objective


if __name__ == "__main__":
    prepare_cli("finetune")
    main()
