"""clean: raw sources -> cleaned corpus shards (outputs/clean/corpus) + stats.json."""

import hydra
from omegaconf import DictConfig

from lmpipe.data.corpus import clean_corpus
from lmpipe.data.sources import source_uri
from lmpipe.evaluation.plots import length_histogram_figure
from lmpipe.runs import lineage
from lmpipe.stage import Stage, prepare_cli


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("clean", cfg) as stage:
        report = clean_corpus(stage.cfg.data, stage.cfg.clean, stage.output("corpus"))
        stats = report.stats()
        stage.write_json(
            "stats.json",
            {
                **stats,
                "per_source_in": dict(report.per_source_in),
                "per_source_out": dict(report.per_source_out),
            },
        )
        stage.log_metrics(stats)
        stage.log_inputs(
            lineage.Input(source, digest, lineage.RAW, source_uri(source, stage.cfg.data))
            for source, digest in report.source_digests().items()
        )
        histogram = report.length_histogram()
        stage.log_dict(report.dropped_samples, "dropped_samples.json")
        stage.log_dict(histogram, "length_histogram.json")
        stage.log_figure(length_histogram_figure(histogram), "length_histogram.png")


if __name__ == "__main__":
    prepare_cli("clean")
    main()
