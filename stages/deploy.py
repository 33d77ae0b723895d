"""deploy: fine-tuned model + evaluate metrics -> registered MLflow model versions (fp32 and
int8), the champion/challenger alias from the quality gate, a smoke test through the
registry, and outputs/deploy/deploy.json."""

import json
from dataclasses import asdict

import hydra
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from lmpipe.deploy.release import deploy
from lmpipe.runs import lineage
from lmpipe.stage import Stage, prepare_cli


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("deploy", cfg, upstream=("evaluate", "finetune")) as stage:
        metrics = json.loads(stage.input("evaluate", "metrics.json").read_text())
        predictions = pd.read_csv(stage.input("evaluate", "predictions.csv"),
                                  keep_default_na=False)  # fmt: skip
        task = stage.cfg.finetune.task
        # Held-out inputs are the latency workload of the fp32 vs int8 comparison.
        requests = predictions["text" if task == "classify" else "prompt"].astype(str).tolist()
        # The version names the run of every stage from clean to this deploy.
        tags = lineage.version_tags(stage.run_id, MlflowClient())
        # The version's run carries the metrics it was gated on (the next champion check).
        stage.log_metrics(metrics)
        result = deploy(stage.input("finetune", "model"), task, metrics, stage.cfg.deploy, tags,
                        requests)  # fmt: skip
        stage.write_json("deploy.json", asdict(result))
        summary = {
            "smoke_latency_seconds": result.smoke_latency_seconds,
            "gate_passed": result.gate["passed"],
        }
        if result.quantized:
            summary |= {
                f"int8.{k}": v for k, v in result.quantized.items() if isinstance(v, int | float)
            }
        stage.log_metrics(summary)
        mlflow.set_tag("lmpipe.deploy.alias", result.alias)


if __name__ == "__main__":
    prepare_cli("deploy")
    main()
