"""tokenize: cleaned corpus -> BPE tokenizer (outputs/tokenize/tokenizer) + token shards.

With `model.init_from` (continued pretraining or finetuning an existing model) the base
model's own tokenizer is used instead of training one. For an encoder (`model.family`)
the tokenizer gets [CLS]/[SEP]/[MASK] and each document is framed as [CLS] doc [SEP].
"""

import time
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

from lmpipe.data.tokenizer import base_tokenizer, train_tokenizer, training_sample
from lmpipe.data.tokens import encode_corpus
from lmpipe.stage import Stage, prepare_cli


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("tokenize", cfg, upstream=("clean",)) as stage:
        settings = stage.cfg.tokenize
        corpus = stage.input("clean", "corpus")
        start = time.perf_counter()
        if stage.cfg.model.init_from:
            tokenizer = base_tokenizer(stage.cfg.model.init_from)
        else:
            sample = training_sample(corpus, settings.val_fraction, settings.train_sample_chars)
            tokenizer = train_tokenizer(sample, settings.vocab_size, settings.min_frequency,
                                        encoder=stage.cfg.model.family == "encoder")  # fmt: skip
        train_seconds = time.perf_counter() - start
        tokenizer.save_pretrained(stage.output("tokenizer"))
        stats = encode_corpus(
            tokenizer,
            corpus,
            stage.output("tokens"),
            settings.val_fraction,
            settings.block_size,
            settings.shard_tokens,
            settings.batch_docs,
            settings.engine,
            stage.cfg.clean,  # the data stages' executor and workers
        )
        summary = {**asdict(stats), "tokenizer_train_seconds": train_seconds}
        stage.write_json("stats.json", summary)
        stage.log_metrics(summary)


if __name__ == "__main__":
    prepare_cli("tokenize")
    main()
