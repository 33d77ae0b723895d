"""deploy: fine-tuned model + evaluate metrics -> registered MLflow model version, gated alias,
a smoke test through the registry, and outputs/deploy/deploy.json."""

import json
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

from lmpipe.deploy import deploy
from lmpipe.stage import Stage, prepare_cli


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("deploy", cfg, upstream=("evaluate", "finetune")) as stage:
        metrics = json.loads(stage.input("evaluate", "metrics.json").read_text())
        lineage = {f"lmpipe.run.{name}": stage.upstream_run_id(name) for name in stage.upstream}
        lineage["lmpipe.run.deploy"] = stage.run_id
        result = deploy(stage.input("finetune", "model"), metrics, stage.cfg.deploy, lineage)
        stage.write_json("deploy.json", asdict(result))
        stage.log_metrics(
            {
                "smoke_latency_seconds": result.smoke_latency_seconds,
                "gate_passed": result.alias is not None,
            }
        )


if __name__ == "__main__":
    prepare_cli("deploy")
    main()
