"""deploy: fine-tuned model + evaluate metrics -> registered MLflow model versions, one per
variant (fp32, int8, pruned, pruned + int8), each with the champion/challenger alias from
its own held-out score, a smoke test through the registry, every variant's size, latency
and quality on one frontier, the unstructured-sparsity curve, and outputs/deploy/deploy.json.

The pruned model (deploy.prune) is built here: Wanda-scored MLP channels and heads removed
using training-split calibration batches, an optional recovery fine-tune, then scored on
the held-out split as evaluate scores the fine-tuned model.
"""

import json
import logging
from dataclasses import asdict

import hydra
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lmpipe.deploy import gguf_export
from lmpipe.deploy.compress import compress, curve_table
from lmpipe.deploy.release import deploy
from lmpipe.deploy.variants import frontier_figure, frontier_table
from lmpipe.runs import lineage
from lmpipe.runs.tracking import MetricLogger
from lmpipe.stage import Stage, prepare_cli
from lmpipe.tasks.finetuning import checked_task
from lmpipe.training.loop import seed_everything, select_device

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    # What a pruning recovery's checkpoints resume under (an interrupted recovery continues).
    resume_keys = ("seed", "finetune", "deploy.prune", "hardware.precision")
    with Stage("deploy", cfg, upstream=("evaluate", "finetune"), resume_keys=resume_keys) as stage:
        c, d, f = stage.cfg, stage.cfg.deploy, stage.cfg.finetune
        task = checked_task(c)
        # Before any work: a gate whose mode contradicts its metric fails here.
        gate = task.gate(d, f)
        metrics = json.loads(stage.input("evaluate", "metrics.json").read_text())
        predictions = pd.read_csv(stage.input("evaluate", "predictions.csv"),
                                  keep_default_na=False)  # fmt: skip
        # Held-out inputs are the latency workload of every variant.
        requests = predictions[task.serving.input_column].astype(str).tolist()
        model_dir = stage.input("finetune", "model")
        plots = stage.output("plots")
        plots.mkdir()
        pruned_dir = None
        if d.prune.enabled:
            seed_everything(c.seed)
            held_out = task.held_out(f, stage.input("finetune", "pairs.parquet").parent)
            compressed = compress(
                model_dir, held_out, held_out.splits(f), c, device=select_device(c.hardware),
                out_dir=stage.output("pruned"),
                metrics=MetricLogger(stage.run_id, prefix="prune_recovery/"),
                checkpoints=stage.checkpoints, run_id=stage.run_id,
            )  # fmt: skip
            pruned_dir = compressed.pruned_dir
            metrics |= compressed.metrics
            stage.write_json("sparsity.json", {"points": curve_table(compressed.curve)})
            for name, figure in compressed.figures.items():
                figure.savefig(plots / name, dpi=110)
                stage.log_figure(figure, name)
        # The version names the run of every stage from clean to this deploy.
        tags = lineage.version_tags(stage.run_id, MlflowClient())
        # The version's run carries the metrics it was gated on (the next champion check).
        stage.log_metrics(metrics)
        # Per-example scores of every metric that has them (each row names its metric): the
        # next challenger's paired test reads the one its gate needs.
        metrics_scored = [gate.metric, *task.example_metrics(predictions)]
        examples = task.example_table(predictions, metrics_scored)
        result = deploy(model_dir, task, metrics, d, tags, requests, pruned_dir, examples, gate,
                        task.smoke_request(predictions, d))  # fmt: skip
        # What pruning kept, and the validation loss before and after it (and recovery).
        pruning = {k[len("prune.") :]: v for k, v in metrics.items() if k.startswith("prune.")}
        stage.write_json("deploy.json", {**asdict(result), "pruning": pruning})
        figure = frontier_figure(result.variants, gate.metric, gate.mode,
                                 result.fastest_within_quality_budget)  # fmt: skip
        figure.savefig(plots / "frontier.png", dpi=110)
        stage.log_figure(figure, "frontier.png")
        stage.log_table(frontier_table(result.variants), "frontier.json")
        summary = {"smoke_latency_seconds": result.smoke_latency_seconds,
                   "gate_passed": result.gate["passed"]}  # fmt: skip
        for variant, entry in result.variants.items():
            summary |= {f"{variant}.{k}": v for k, v in entry.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        stage.log_metrics(summary)
        # The fine-tuned model for llama.cpp and Ollama, beside the registered pyfunc.
        gguf_dir = stage.output("gguf")
        gguf_dir.mkdir()
        reason = gguf_export.unsupported(model_dir) if d.gguf else None
        if reason:
            log.info("gguf: not written: %s", reason)
        for kind in d.gguf if not reason else []:
            path = gguf_export.export_gguf(model_dir, gguf_dir / f"{d.registered_model_name}-"
                                           f"{kind}.gguf", kind)  # fmt: skip
            stage.log_artifact(path, "gguf")
        mlflow.set_tag("lmpipe.deploy.alias", result.alias)
        mlflow.set_tag("lmpipe.deploy.fastest_within_quality_budget",
                       str(result.fastest_within_quality_budget))  # fmt: skip


if __name__ == "__main__":
    prepare_cli("deploy")
    main()
