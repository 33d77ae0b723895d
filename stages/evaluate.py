"""evaluate: pretrained + fine-tuned models on held-out data -> outputs/evaluate/.

Writes the held-out predictions (predictions.csv) first and computes metrics.json from
that file. sft: the response loss of the pretrained, fine-tuned and int8 models, their
generations, both models' perplexity on the held-out corpus, and (any causal model) bits per
byte on WikiText-2's test text beside optional reference models. classify: accuracy,
macro-F1 and per-class scores of the classifier and its int8 variant beside the
majority class and TF-IDF + logistic regression (fitted on the same training split), a
confusion matrix, and the pretrained model's corpus loss (masked-LM loss for an encoder).
preference: the sft metrics, and each model's reward accuracy and margin on the held-out
pairs (against the reference log-probs finetune saved in pairs.parquet).
champion.json holds the difference to the registry's current champion. With
evaluate.harness.tasks, lm-evaluation-harness scores the pretrained and fine-tuned models
too (harness.json; `<model>_harness_<task>_<metric>` beside our metrics).
"""

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from lmpipe.data.tokenizer import base_tokenizer, load_tokenizer
from lmpipe.data.tokens import load_tokens
from lmpipe.deploy import registry
from lmpipe.deploy.variants import quantization_changes, variant_models
from lmpipe.evaluation.harness import check_tasks, run_harness
from lmpipe.evaluation.held_out_lm import wikitext_scores
from lmpipe.evaluation.lm_metrics import perplexity, unigram_entropy
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tasks.finetuning import checked_task
from lmpipe.tasks.pretraining import pretraining_task
from lmpipe.training.loop import autocast, enable_tf32, seed_everything, select_device
from lmpipe.training.model import load_base

PREDICTIONS = "predictions.csv"


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("evaluate", cfg, upstream=("tokenize", "pretrain", "finetune")) as stage:
        c, e, f = stage.cfg, stage.cfg.evaluate, stage.cfg.finetune
        seed_everything(c.seed)
        device = select_device(c.hardware)
        # The int8 variants stay on the CPU (fbgemm): each model is scored where it lives.
        enable_tf32(device, c.hardware.precision)
        pretraining = pretraining_task(c.model.family, c.pretrain, c.seed)
        task = checked_task(c)
        if e.harness.tasks:  # a task that cannot run fails now, not after the other scores
            check_tasks(list(e.harness.tasks), e.harness.allow_hub)
        with autocast(device, c.hardware.precision):
            finetuned_dir = stage.input("finetune", "model")
            tokenizer = load_tokenizer(finetuned_dir)
            pretrained = pretraining.load(stage.input("pretrain", "model")).to(device)

            # Held-out corpus text: how well the pretrained model models language.
            val_tokens = load_tokens(stage.input("tokenize", "tokens"), "val")
            seq_len = c.pretrain.seq_len

            def corpus_loss(model) -> tuple[float, int]:
                return pretraining.corpus_loss(model, tokenizer, val_tokens, e.batch_size,
                                               seq_len, e.max_tokens, device)  # fmt: skip

            # WikiText-2 in bits per byte: our causal models, and reference models (loaded one
            # at a time) scored in the same run.
            references = ((spec, load_base(spec), base_tokenizer(spec))
                          for spec in e.wikitext.references)  # fmt: skip
            corpus = (
                wikitext_scores(e.wikitext, {"pretrained": pretrained}, tokenizer, seq_len,
                                e.batch_size, device, references)
                if c.model.family == "decoder" else {}
            )  # fmt: skip
            val_loss, val_count = corpus_loss(pretrained)
            corpus |= {
                "pretrained_val_loss": val_loss,
                "pretrained_val_perplexity": perplexity(val_loss),
                "val_tokens": val_count,
                "unigram_entropy": unigram_entropy(
                    val_tokens[: min(len(val_tokens), e.max_tokens) // seq_len * seq_len],
                    len(tokenizer),
                ),
            }

            predictions_path = stage.output(PREDICTIONS)
            plots = stage.output("plots")
            plots.mkdir()
            # The fine-tuned model and the variants made from it (int8): lmpipe.deploy.variants.
            models = variant_models(lambda: task.load(finetuned_dir), "finetuned", device,
                                    c.deploy.quantize)  # fmt: skip
            finetuned = models["finetuned"]
            if task.before_tuning_is_comparable:
                # What fine-tuning did to language modelling of the held-out corpus (forgetting).
                tuned_loss, _ = corpus_loss(finetuned)
                corpus |= {"finetuned_val_loss": tuned_loss, "finetuned_val_perplexity":
                           perplexity(tuned_loss)}  # fmt: skip
                corpus |= wikitext_scores(e.wikitext, {"finetuned": finetuned}, tokenizer, seq_len,
                                          e.batch_size, device)  # fmt: skip
                models = {"pretrained": pretrained, **models}  # the model before tuning
            task = task.held_out(f, stage.input("finetune", "pairs.parquet").parent)
            splits = task.splits(f)
            frame = task.predict(models, tokenizer, splits, f, e)
            frame.to_csv(predictions_path, index=False)
            # The metrics come from the saved file.
            saved = pd.read_csv(predictions_path, keep_default_na=False)
            metrics = task.score(saved, list(models), splits)
            report = task.report(saved, metrics, list(models), e)
            for name, figure in report.figures.items():
                figure.savefig(plots / name, dpi=110)
                stage.log_figure(figure, name)
            for name, table in report.tables.items():
                stage.log_table(table, name)
        metrics = {**corpus, **metrics}
        metrics |= quantization_changes(metrics)  # each quantized variant minus fp32
        harness_results = {}
        if e.harness.tasks and c.model.family == "decoder":
            # lm-evaluation-harness on the same models, beside our own metrics.
            harness, harness_results = run_harness(
                {"pretrained": stage.input("pretrain", "model"), "finetuned": finetuned_dir},
                list(e.harness.tasks), OmegaConf.to_container(f, resolve=True),
                limit=e.harness.limit, batch_size=e.harness.batch_size,
                max_new_tokens=e.max_new_tokens, device=str(device),
                allow_hub=e.harness.allow_hub,
            )  # fmt: skip
            metrics |= harness
        stage.write_json("harness.json", {"tasks": list(e.harness.tasks),
                                          "results": harness_results})  # fmt: skip
        stage.write_json("metrics.json", metrics)
        stage.log_metrics(metrics)
        stage.log_artifact(predictions_path, "predictions")

        champion = registry.aliased(c.deploy.registered_model_name, registry.CHAMPION)
        comparison = registry.compare(metrics, champion)
        stage.write_json("champion.json", comparison)
        stage.log_metrics(
            {f"vs_champion.{k}": v["difference"] for k, v in comparison["metrics"].items()}
        )


if __name__ == "__main__":
    prepare_cli("evaluate")
    main()
