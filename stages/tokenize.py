"""tokenize: cleaned corpus -> BPE tokenizer (outputs/tokenize/tokenizer) + token shards."""

import time
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

from lmpipe.stage import Stage, prepare_cli
from lmpipe.tokenizer import corpus_texts, encode_corpus, train_tokenizer


@hydra.main(version_base="1.3", config_path="..", config_name="params")
def main(cfg: DictConfig) -> None:
    with Stage("tokenize", cfg, upstream=("clean",)) as stage:
        settings = stage.cfg.tokenize
        corpus = stage.input("clean", "corpus")
        start = time.perf_counter()
        texts = corpus_texts(corpus, settings.val_fraction, settings.train_sample_docs)
        tokenizer = train_tokenizer(texts, settings.vocab_size, settings.min_frequency)
        train_seconds = time.perf_counter() - start
        tokenizer.save_pretrained(stage.output("tokenizer"))
        stats = encode_corpus(
            tokenizer, corpus, stage.output("tokens"), settings.val_fraction, settings.batch_docs
        )
        summary = {**asdict(stats), "tokenizer_train_seconds": train_seconds}
        summary.pop("dtype")
        stage.write_json("stats.json", summary)
        stage.log_metrics(summary)


if __name__ == "__main__":
    prepare_cli("tokenize")
    main()
